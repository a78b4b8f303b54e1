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
from kana.openapi import COMPONENTS, JSON_VALUE_REF, NOT_BLANK_TEXT_PATTERN, TEXT_PATTERN, padded
from users.identifiers import MAX_ID_LENGTH, NOBODY_IDS

from .messages import MAX_BATCH_MESSAGES, MAX_EVENT_NAME_LENGTH, MAX_EXACT_NUMBER, MAX_MESSAGE_ID_LENGTH

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
# JSON Schema (OpenAPI 3.1) stating what ``messages.parse_message`` accepts, field by field.
# Segment's protocol is lenient: keys Kana does not read are kept on the event, so every
# message allows other keys (``additionalProperties``), but nothing in it may contain NUL.

_NO_NUL = {"pattern": TEXT_PATTERN}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_LITERAL = {"[": r"\[", "]": r"\]"}


def _nobody_pattern() -> str:
    # The "nobody" ids, case-insensitive (JSON Schema regexes have no flags).
    spelled = (
        "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else _LITERAL.get(c, c) for c in i) for i in NOBODY_IDS
    )
    return padded("|".join(sorted(spelled)))


# A userId, previousId or groupId: text (trimmed) or a number, never a "nobody" value such as
# "", "null", "anonymous", 0 or -1 (users.identifiers), at most 255 characters.
SEGMENT_ID = {
    "description": 'Text or a number; "nobody" values ("", "null", "anonymous", 0, -1, …) count as absent.',
    "anyOf": [
        {
            "type": "string",
            "maxLength": MAX_ID_LENGTH,
            "pattern": NOT_BLANK_TEXT_PATTERN,
            "not": {"pattern": _nobody_pattern()},
        },
        # Numbers only where JSON keeps them exact (beyond, send the id as text).
        {
            "type": "number",
            "exclusiveMaximum": MAX_EXACT_NUMBER,
            "exclusiveMinimum": -MAX_EXACT_NUMBER,
            "not": {"enum": [0, -1]},
        },
    ],
}
_TIME = {
    "description": 'ISO 8601; null or "" count as absent.',
    "anyOf": [{"type": "null"}, {"const": ""}, {"type": "string", "format": "date-time"}],
}
_OBJECT = {"type": ["object", "null"], "propertyNames": _NO_NUL, "additionalProperties": JSON_VALUE_REF}
_COMMON = {
    "messageId": {
        "type": ["string", "null"],
        "maxLength": MAX_MESSAGE_ID_LENGTH,
        **_NO_NUL,
        "description": "Unique per workspace, forever: a replay answers 200 and changes nothing. Assigned when "
        "absent or blank.",
    },
    "userId": {
        **SEGMENT_ID,
        "description": "Your id of the user. " + SEGMENT_ID["description"],
    },
    "anonymousId": {
        **JSON_VALUE_REF,
        "description": "Without a userId: held as pending when the workspace's anonymous_events is hold, else "
        "400; an identify with both ids links the pending events to its user.",
    },
    "timestamp": {**_TIME, "description": "When it happened (wins over the others). " + _TIME["description"]},
    "originalTimestamp": {**_TIME, "description": "The device's time."},
    "sentAt": {**_TIME, "description": "When the device sent it (corrects clock skew)."},
    "receivedAt": _TIME,
    "context": _OBJECT,
    "integrations": _OBJECT,
    "writeKey": {"type": ["string", "null"], "description": "The API key, unless sent in Authorization (not stored)."},
}


_MESSAGES = {
    "identify": {
        "properties": {
            "traits": {
                **_OBJECT,
                "description": "name, email (matched case-insensitively), billingUserId or billingId (Stripe "
                "`cus_…` or a Chargebee customer id) set the user; an invalid one is not stored and comes back in "
                "`warnings`. Other traits are kept on the event.",
            }
        },
        "required": [],
    },
    "track": {
        "properties": {
            "event": {"type": "string", "maxLength": MAX_EVENT_NAME_LENGTH, "pattern": NOT_BLANK_TEXT_PATTERN},
            "properties": {
                **_OBJECT,
                "description": "Any properties; mapping rules read them by dot path. `featureId` maps the event "
                "straight to that feature; `delta`, the amount of usage (default 1, negative undoes). An unknown "
                "feature or a delta that is not a number leaves the event unmapped (`reason`).",
            },
        },
        "required": ["event"],
    },
    "page": {
        "properties": {
            "name": {
                "type": ["string", "null"],
                **_NO_NUL,
                "description": "Stored as the event `Viewed <name> Page` / `Screen` (else `properties.name`).",
            },
            "properties": _OBJECT,
        },
        "required": [],
    },
    "group": {
        "properties": {"groupId": SEGMENT_ID, "traits": _OBJECT},
        "required": ["groupId"],
    },
    "alias": {
        "properties": {"previousId": {**SEGMENT_ID, "description": "Becomes an alias of userId (not userId itself)."}},
        "required": ["previousId"],
    },
}


def _message_schema(kind: str) -> dict:
    spec = _MESSAGES[kind]
    return {
        "type": "object",
        "properties": {
            **_COMMON,
            "type": {**JSON_VALUE_REF, "description": "Ignored: the path names the type."},
            **spec["properties"],
        },
        "required": ["userId", *spec["required"]],
        "propertyNames": _NO_NUL,
        "additionalProperties": JSON_VALUE_REF,
    }


_COMPONENT = {kind: f"Segment{kind.title()}" for kind in _MESSAGES}
_TYPE_SCHEMA = {**_COMPONENT, "screen": _COMPONENT["page"]}
# One message of any type, as /segment/events and each item of a batch take it.
SEGMENT_MESSAGE = {
    "oneOf": [
        {"allOf": [_ref(component), {"required": ["type"], "properties": {"type": {"const": kind}}}]}
        for kind, component in _TYPE_SCHEMA.items()
    ],
    "description": f"A message whose `type` is one of {', '.join(MessageType.values)}.",
}
_BATCH = {
    "type": "object",
    "properties": {
        "batch": {
            "type": "array",
            "maxItems": MAX_BATCH_MESSAGES,
            "items": {"description": "A message; an invalid one is listed in `rejected`, the others are applied."},
            # At least one valid message, or none at all. ("Not every item is invalid": the same
            # as `contains`, which schemathesis' coverage phase cannot draw in reasonable time.)
            "anyOf": [{"maxItems": 0}, {"not": {"items": {"not": _ref("SegmentMessage")}}}],
        },
        "context": {**_OBJECT, "description": "Fills what each message's context lacks."},
        "integrations": _OBJECT,
        "sentAt": _TIME,
        "receivedAt": _TIME,
        "writeKey": _COMMON["writeKey"],
    },
    "required": ["batch"],
    "additionalProperties": {"description": "Ignored."},
}
SCHEMAS = {
    **{component: _message_schema(kind) for kind, component in _COMPONENT.items()},
    "SegmentMessage": SEGMENT_MESSAGE,
    "SegmentBatch": _BATCH,
    **COMPONENTS,
}


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
    # The components the request schemas refer to (api.schema.KanaSchemaGenerator adds them).
    openapi_components = SCHEMAS
    request_body_required = True
    # The statuses these endpoints answer; the generic ones (404 object, 415) do not apply.
    kana_error_statuses = ()


def _single(message_type: str, component: str, example: dict, description: str):
    class StandIn(_IngestStandIn):
        @extend_schema(
            operation_id=f"segment_{message_type}",
            summary=f"Segment {message_type} call",
            description=description,
            tags=[TAG],
            request={"application/json": _ref(component)},
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
        "SegmentMessage",
        {"type": "track", **_TRACK},
        "One Segment message of any `type` (Kana destination, Segment's webhook destination).",
    ),
    "segment-identify": _single(
        "identify",
        "SegmentIdentify",
        _IDENTIFY,
        "Creates, updates or merges the user (docs/identity.md); an invalid billing id is not stored and "
        "comes back in `warnings`.",
    ),
    "segment-track": _single(
        "track",
        "SegmentTrack",
        _TRACK,
        "Records usage: by `properties.featureId`, else by the mapping rules. Without a userId: 400 "
        "`anonymous_event`, or `pending` when the workspace holds anonymous events.",
    ),
    "segment-page": _single(
        "page", "SegmentPage", {"userId": "u-123", "name": "Pricing"}, "Stored as the event `Viewed <name> Page`."
    ),
    "segment-screen": _single(
        "screen", "SegmentPage", {"userId": "u-123", "name": "Home"}, "Stored as the event `Viewed <name> Screen`."
    ),
    "segment-group": _single(
        "group",
        "SegmentGroup",
        {"userId": "u-123", "groupId": "acme-inc", "traits": {"name": "Acme Inc."}},
        "Records the user's membership of a group (account) and its traits.",
    ),
    "segment-alias": _single(
        "alias",
        "SegmentAlias",
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
        request={"application/json": _ref("SegmentBatch")},
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
