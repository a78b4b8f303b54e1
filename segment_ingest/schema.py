"""OpenAPI description of Segment's endpoints (``/segment/events``, ``/v1/...``).

The endpoints are plain Django views (the hot path skips DRF; see ``views.py``), which
drf-spectacular cannot inspect. Each is described here by a stand-in ``APIView`` that is
never routed: ``describe(urlpatterns)`` (called by ``urls.py``) hangs it on the real view as
``view.openapi_view``, and the project's schema generator (``api.schema``) documents the real
path with it. Shapes follow ``messages.py`` (requests) and ``views.py`` (answers).
"""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.authentication import BaseAuthentication
from rest_framework.parsers import JSONParser
from rest_framework.views import APIView

from features.models import MessageType
from users.identifiers import MAX_ID_LENGTH

from .messages import MAX_BATCH_MESSAGES, MAX_EVENT_NAME_LENGTH, MAX_MESSAGE_ID_LENGTH

TAG = "Segment ingest"


class SegmentWriteKey(BaseAuthentication):
    """Documentation only: how Segment sends the key (``views._authenticate`` checks it)."""

    def authenticate(self, request):  # pragma: no cover - never installed on a view that runs
        return None


class SegmentWriteKeyScheme(OpenApiAuthenticationExtension):
    target_class = SegmentWriteKey
    name = "SegmentWriteKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "basic",
            "description": (
                "What Segment and its libraries send: HTTP Basic auth with the workspace API key as the user "
                "name and an empty password (`Basic base64(<key>:)`). `Bearer <key>`, the bare key, or "
                '`"writeKey": "<key>"` in the JSON body work too. A workspace with a shared secret also '
                "requires `X-Signature`: the hex HMAC-SHA1 of the raw body."
            ),
        }


# --- Requests --------------------------------------------------------------------------


class _SegmentMessage(serializers.Serializer):
    """Fields every Segment message may carry."""

    messageId = serializers.CharField(
        required=False,
        max_length=MAX_MESSAGE_ID_LENGTH,
        help_text="Unique per workspace, forever: a replay answers 200 and changes nothing. Assigned when absent.",
    )
    userId = serializers.CharField(
        required=False, max_length=MAX_ID_LENGTH, help_text="Your id of the user (numbers are read as text)."
    )
    anonymousId = serializers.CharField(
        required=False,
        help_text="Without a userId: held as pending when the workspace's anonymous_events is hold, else 400; "
        "an identify with both ids links the pending events to its user.",
    )
    timestamp = serializers.DateTimeField(required=False, help_text="When it happened (wins over the others).")
    originalTimestamp = serializers.DateTimeField(required=False, help_text="The device's time.")
    sentAt = serializers.DateTimeField(required=False, help_text="When the device sent it (corrects clock skew).")
    receivedAt = serializers.DateTimeField(required=False)
    context = serializers.DictField(required=False)
    integrations = serializers.DictField(required=False)
    writeKey = serializers.CharField(required=False, help_text="The API key, when not sent in Authorization.")


class IdentifyTraits(serializers.Serializer):
    name = serializers.CharField(required=False, allow_null=True)
    email = serializers.CharField(required=False, allow_null=True, help_text="Matched case-insensitively.")
    billingUserId = serializers.CharField(
        required=False, allow_null=True, help_text="Stripe `cus_…` or a Chargebee customer id."
    )
    billingId = serializers.CharField(required=False, allow_null=True, help_text="Same as billingUserId.")

    class Meta:
        ref_name = "IdentifyTraits"


class SegmentIdentify(_SegmentMessage):
    userId = serializers.CharField(max_length=MAX_ID_LENGTH)
    traits = IdentifyTraits(required=False, help_text="Other traits are kept on the event, not on the user.")


class TrackProperties(serializers.Serializer):
    featureId = serializers.CharField(required=False, help_text="Maps the event straight to this feature.")
    delta = serializers.FloatField(required=False, help_text="The amount of usage, default 1; negative undoes.")


class SegmentTrack(_SegmentMessage):
    userId = serializers.CharField(max_length=MAX_ID_LENGTH)
    event = serializers.CharField(max_length=MAX_EVENT_NAME_LENGTH)
    properties = TrackProperties(required=False, help_text="Any properties; mapping rules read them by dot path.")


class SegmentPage(_SegmentMessage):
    userId = serializers.CharField(max_length=MAX_ID_LENGTH)
    name = serializers.CharField(required=False, help_text="Stored as the event `Viewed <name> Page` / `Screen`.")
    properties = serializers.DictField(required=False)


class SegmentGroup(_SegmentMessage):
    userId = serializers.CharField(max_length=MAX_ID_LENGTH)
    groupId = serializers.CharField(max_length=MAX_ID_LENGTH)
    traits = serializers.DictField(required=False)


class SegmentAlias(_SegmentMessage):
    userId = serializers.CharField(max_length=MAX_ID_LENGTH)
    previousId = serializers.CharField(max_length=MAX_ID_LENGTH, help_text="Becomes an alias of userId.")


class SegmentMessage(_SegmentMessage):
    # Text, not an enum: drf-spectacular would name the enum after the field and rename the
    # features' ``TypeEnum`` that clients may already use.
    type = serializers.CharField(help_text=f"One of {', '.join(MessageType.values)}.")
    event = serializers.CharField(required=False, max_length=MAX_EVENT_NAME_LENGTH, help_text="track")
    name = serializers.CharField(required=False, help_text="page, screen")
    properties = serializers.DictField(required=False, help_text="track, page, screen")
    traits = serializers.DictField(required=False, help_text="identify, group")
    groupId = serializers.CharField(required=False, help_text="group")
    previousId = serializers.CharField(required=False, help_text="alias")


class SegmentBatchBody(serializers.Serializer):
    batch = serializers.ListField(child=SegmentMessage(), max_length=MAX_BATCH_MESSAGES)
    context = serializers.DictField(required=False, help_text="Fills what each message's context lacks.")
    integrations = serializers.DictField(required=False)
    sentAt = serializers.DateTimeField(required=False)
    writeKey = serializers.CharField(required=False)


# --- Answers ---------------------------------------------------------------------------


class IngestProblem(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    field = serializers.CharField(required=False)


class IngestRejected(IngestProblem):
    index = serializers.IntegerField(help_text="Position of the message in `batch`.")


class IngestListed(serializers.Serializer):
    index = serializers.IntegerField(help_text="Position of the message in `batch`.")
    message_id = serializers.CharField()


class IngestAccepted(serializers.Serializer):
    success = serializers.BooleanField(help_text="Always true.")
    message_id = serializers.CharField()
    status = serializers.CharField(
        help_text="`processed` (identify, group, alias), `mapped`, `unmapped` (see `reason`), `duplicate` "
        "(a replay: nothing changed), `pending` (an anonymous event the workspace holds until an identify or "
        "alias names its anonymousId) or `suppressed` (names a deleted user's userId: not stored)."
    )
    reason = serializers.CharField(
        required=False, help_text="Why an event is unmapped: `no_matching_rule`, `unknown_feature`, `invalid_delta`."
    )
    warnings = IngestProblem(many=True, required=False, help_text="What was not applied, e.g. an invalid billing id.")


class IngestBatchAccepted(serializers.Serializer):
    success = serializers.BooleanField(help_text="Always true.")
    accepted = serializers.IntegerField(help_text="Messages applied (duplicates excluded).")
    duplicates = serializers.IntegerField(help_text="Replays: answered, nothing changed.")
    rejected = IngestRejected(many=True, help_text="Each invalid message, by index; the valid ones were applied.")
    pending = IngestListed(
        many=True, required=False, help_text="Anonymous events held until an identify or alias names them (if any)."
    )
    suppressed = IngestListed(
        many=True, required=False, help_text="Messages naming a deleted user's userId: not stored (if any)."
    )


class IngestError(serializers.Serializer):
    success = serializers.BooleanField(help_text="Always false.")
    code = serializers.CharField(help_text="Machine-readable reason, e.g. `missing_user_id`, `invalid_api_key`.")
    message = serializers.CharField()
    field = serializers.CharField(required=False, help_text="The field at fault, when there is one.")
    rejected = IngestRejected(many=True, required=False, help_text="Batch: every message, when none is valid.")


_RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    OpenApiTypes.INT,
    location=OpenApiParameter.HEADER,
    response=[429, 503],
    required=True,
    description="Seconds to wait before retrying (Segment does).",
)


def _errors(too_large: str) -> dict:
    error = IngestError
    return {
        400: OpenApiResponse(error, "Malformed or invalid (not retried): `code` says why, `field` where."),
        401: OpenApiResponse(error, "Missing, unknown or revoked key, or a wrong `X-Signature`."),
        405: OpenApiResponse(error, "Only POST."),
        413: OpenApiResponse(error, too_large),
        429: OpenApiResponse(error, "Overloaded: retry after `Retry-After` seconds."),
        503: OpenApiResponse(error, "The database is unavailable: retry after `Retry-After` seconds."),
    }


_SINGLE_ERRORS = _errors("The message is over 32 KB.")


class _IngestStandIn(APIView):
    """Never routed: describes a plain view of ``views.py`` for the schema."""

    authentication_classes = [SegmentWriteKey]
    parser_classes = [JSONParser]
    # The statuses these endpoints answer; the generic ones (404 object, 415) do not apply.
    kana_error_statuses = ()


def _single(message_type: str, serializer, example: dict, description: str):
    class StandIn(_IngestStandIn):
        @extend_schema(
            operation_id=f"segment_{message_type}",
            summary=f"Segment {message_type} call",
            description=description,
            tags=[TAG],
            request=serializer,
            responses={
                200: OpenApiResponse(IngestAccepted, "Applied, or stored for mapping; `duplicate` for a replay."),
                **_SINGLE_ERRORS,
            },
            parameters=[_RETRY_AFTER],
            examples=[OpenApiExample(message_type, value=example, request_only=True)],
        )
        def post(self, request):  # pragma: no cover - never routed
            raise AssertionError("documentation only: segment_ingest.views serves this path")

    StandIn.__name__ = StandIn.__qualname__ = f"Segment{message_type.title()}"
    return StandIn


_IDENTIFY = {"userId": "u-123", "traits": {"name": "John Doe", "email": "john@example.com", "billingId": "cus_L1"}}
_TRACK = {"userId": "u-123", "event": "Message Sent", "properties": {"featureId": "messages", "delta": 1}}

INGEST_DOCS: dict[str, type[APIView]] = {
    "segment-events": _single(
        "events",
        SegmentMessage,
        {"type": "track", **_TRACK},
        "One Segment message of any `type` (Kana destination, Segment's webhook destination).",
    ),
    "segment-identify": _single(
        "identify",
        SegmentIdentify,
        _IDENTIFY,
        "Creates, updates or merges the user (docs/identity.md); an invalid billing id is not stored and "
        "comes back in `warnings`.",
    ),
    "segment-track": _single(
        "track",
        SegmentTrack,
        _TRACK,
        "Records usage: by `properties.featureId`, else by the mapping rules. Without a userId: 400 "
        "`anonymous_event`, or `pending` when the workspace holds anonymous events.",
    ),
    "segment-page": _single(
        "page", SegmentPage, {"userId": "u-123", "name": "Pricing"}, "Stored as the event `Viewed <name> Page`."
    ),
    "segment-screen": _single(
        "screen", SegmentPage, {"userId": "u-123", "name": "Home"}, "Stored as the event `Viewed <name> Screen`."
    ),
    "segment-group": _single(
        "group",
        SegmentGroup,
        {"userId": "u-123", "groupId": "acme-inc", "traits": {"name": "Acme Inc."}},
        "Records the user's membership of a group (account) and its traits.",
    ),
    "segment-alias": _single(
        "alias",
        SegmentAlias,
        {"userId": "u-123", "previousId": "anon-42"},
        "Makes previousId and userId one user (merged into the oldest); userId stays canonical.",
    ),
}


class SegmentBatch(_IngestStandIn):
    """``/v1/batch`` and ``/v1/import`` (one view): operation ids come from the paths."""

    @extend_schema(
        summary=f"Segment batch: up to {MAX_BATCH_MESSAGES:,} messages (/v1/import is the same)",
        description=(
            "Valid messages are applied, each invalid one is listed in `rejected` by index (nothing is dropped "
            "silently); a batch with no valid message is a 400. At most 500 KB, 32 KB a message. Batch-level "
            "`context` fills what each message's context lacks."
        ),
        tags=[TAG],
        request=SegmentBatchBody,
        responses={
            200: OpenApiResponse(IngestBatchAccepted, "The valid messages were applied; `rejected` lists the others."),
            **_errors("The body is over 500 KB."),
        },
        parameters=[_RETRY_AFTER],
        examples=[
            OpenApiExample(
                "batch",
                value={"batch": [{"type": "identify", **_IDENTIFY}, {"type": "track", **_TRACK}]},
                request_only=True,
            )
        ],
    )
    def post(self, request):  # pragma: no cover - never routed
        raise AssertionError("documentation only: segment_ingest.views serves this path")


INGEST_DOCS["segment-batch"] = INGEST_DOCS["segment-import"] = SegmentBatch


def describe(urlpatterns: list) -> list:
    """Give each Segment endpoint its stand-in, as the ``openapi_view`` attribute that the
    project's schema generator reads (``api.schema.KanaEndpointEnumerator``)."""
    for pattern in urlpatterns:
        pattern.callback.openapi_view = INGEST_DOCS[pattern.name]
    return urlpatterns
