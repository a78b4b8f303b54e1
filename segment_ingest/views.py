"""Segment-facing HTTP endpoints. They translate HTTP to ``ingest_messages`` and back.

Plain Django views (not DRF): this is the hot path, and Segment only needs JSON in and out.
Status codes follow what Segment's libraries retry: 4xx is final, 429 and 5xx are retried.
"""

import hashlib
import hmac
import json
import logging
import zlib

from django.db import InterfaceError, OperationalError
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from features.ingest import OUTCOME_SUPPRESSED, ingest_messages
from features.models import EventStatus
from kana.errors import DomainError, error_body
from kana.models import AnonymousEvents
from kana.request_auth import api_key_from_authorization
from kana.retries import RetriesExhausted
from kana.services import workspace_for_api_key

from .messages import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    MAX_MESSAGE_BYTES,
    parse_message,
    with_batch_context,
)

logger = logging.getLogger(__name__)

# SQLSTATEs that mean "busy, try again": lock wait or statement timeout, deadlock and
# serialization failures that survived the service's own retries.
_OVERLOADED_SQLSTATES = {"55P03", "57014", "40001", "40P01"}
RETRY_AFTER_SECONDS = "5"


def error_response(code: str, message: str, status: int, field: str | None = None, **extra) -> JsonResponse:
    response = JsonResponse({"success": False, **error_body(code, message, field, **extra)}, status=status)
    if status in (429, 503):
        response["Retry-After"] = RETRY_AFTER_SECONDS
    return response


class _Rejected(Exception):
    def __init__(self, response: JsonResponse):
        self.response = response


def _read_body(request, limit: int, too_large_code: str) -> bytes:
    """The request body, gunzipped when sent so, refused beyond ``limit`` bytes."""
    too_large = _Rejected(error_response(too_large_code, f"the body may be at most {limit // 1024} KB", 413))
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit * 4:
        raise too_large
    raw = request.read(limit * 4 + 1)
    if request.headers.get("Content-Encoding", "").lower() == "gzip":
        try:
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            body = decompressor.decompress(raw, limit + 1)
        except zlib.error:
            raise _Rejected(error_response("invalid_gzip", "the body is not valid gzip", 400)) from None
    else:
        body = raw
    if len(body) > limit:
        raise too_large
    return body


def _authenticate(request, body: bytes, parsed):
    key = api_key_from_authorization(request.headers.get("Authorization", ""))
    if not key and isinstance(parsed, dict) and isinstance(parsed.get("writeKey"), str):
        key = parsed["writeKey"]
    if not key:
        raise _Rejected(
            error_response("missing_api_key", "send your Kana API key (Basic auth, Bearer, or writeKey)", 401)
        )
    workspace = workspace_for_api_key(key)
    if workspace is None:
        raise _Rejected(error_response("invalid_api_key", "unknown or revoked API key", 401))
    if workspace.signing_secret:
        expected = hmac.new(workspace.signing_secret.encode(), body, hashlib.sha1).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-Signature", "").strip().lower()):
            raise _Rejected(error_response("invalid_signature", "X-Signature does not match the body", 401))
    return workspace


def _parse_json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        return _INVALID


_INVALID = object()


def _prepare(request, limit: int, too_large_code: str):
    body = _read_body(request, limit, too_large_code)
    parsed = _parse_json(body)
    workspace = _authenticate(request, body, None if parsed is _INVALID else parsed)
    if parsed is _INVALID:
        raise _Rejected(error_response("invalid_json", "the body is not valid JSON", 400))
    if not isinstance(parsed, dict):
        raise _Rejected(error_response("invalid_message", "the body must be a JSON object", 400))
    return workspace, parsed, len(body)


def _database_guard(view):
    """Map database trouble to the retryable answers Segment understands."""

    def wrapped(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except _Rejected as rejected:
            return rejected.response
        except RetriesExhausted:
            return error_response("conflict_retry", "Kana is busy with concurrent changes; retry shortly", 503)
        except (OperationalError, InterfaceError) as exc:
            sqlstate = getattr(exc.__cause__, "sqlstate", None)
            if sqlstate in _OVERLOADED_SQLSTATES:
                logger.warning("ingest overloaded", extra={"sqlstate": sqlstate})
                return error_response("overloaded", "Kana is busy; retry shortly", 429)
            logger.error("database unavailable during ingest", extra={"error": type(exc).__name__})
            return error_response("database_unavailable", "Kana's database is unavailable; retry shortly", 503)

    wrapped.__name__ = view.__name__
    return csrf_exempt(require_POST(wrapped))


def _single(request, forced_type: str | None):
    workspace, payload, size = _prepare(request, MAX_MESSAGE_BYTES, "message_too_large")
    payload.pop("writeKey", None)
    try:
        message = parse_message(
            payload, received_at=timezone.now(), forced_type=forced_type, size=size, hold_anonymous=_holds(workspace)
        )
    except DomainError as exc:
        return error_response(exc.code, exc.message, exc.status, exc.field)
    outcome = ingest_messages(workspace=workspace, messages=[message])[0]
    body = {"success": True, "message_id": outcome.message_id, "status": outcome.status}
    if outcome.reason:
        body["reason"] = outcome.reason
    if outcome.warnings:
        body["warnings"] = outcome.warnings
    return JsonResponse(body)


@_database_guard
def segment_events(request):
    """One Segment message of any type (Kana destination, Segment webhook destination)."""
    return _single(request, None)


def typed_endpoint(message_type: str):
    @_database_guard
    def view(request):
        return _single(request, message_type)

    view.__name__ = f"v1_{message_type}"
    return view


@_database_guard
def batch(request):
    """``/v1/batch`` and ``/v1/import``: valid messages are applied, each rejected one is
    listed with its index and reason."""
    workspace, payload, _size = _prepare(request, MAX_BATCH_BYTES, "batch_too_large")
    items = payload.get("batch")
    if not isinstance(items, list):
        return error_response("invalid_batch", "batch must be a list of messages", 400, "batch")
    if len(items) > MAX_BATCH_MESSAGES:
        return error_response(
            "too_many_messages", f"a batch may hold at most {MAX_BATCH_MESSAGES} messages", 400, "batch"
        )
    received_at = timezone.now()
    hold_anonymous = _holds(workspace)
    messages, indexes, rejected = [], [], []
    for index, item in enumerate(items):
        try:
            item = with_batch_context(item, payload)
            if isinstance(item, dict):
                item.pop("writeKey", None)
            messages.append(parse_message(item, received_at=received_at, hold_anonymous=hold_anonymous))
            indexes.append(index)
        except DomainError as exc:
            rejected.append({"index": index, **exc.as_dict()})
    if not messages and rejected:
        return error_response("invalid_batch", "no message in the batch is valid", 400, "batch", rejected=rejected)
    outcomes = ingest_messages(workspace=workspace, messages=messages)
    # Messages answered something other than stored or replayed, by index (SPEC §12).
    held = {status: [] for status in _LISTED_STATUSES}
    for index, outcome in zip(indexes, outcomes, strict=True):
        if outcome.status in held:
            held[outcome.status].append({"index": index, "message_id": outcome.message_id})
    duplicates = sum(1 for o in outcomes if o.status == "duplicate")
    accepted = len(outcomes) - duplicates - len(held[OUTCOME_SUPPRESSED])
    listed = {status: entries for status, entries in held.items() if entries}  # present only when some are
    return JsonResponse(
        {"success": True, "accepted": accepted, "duplicates": duplicates, "rejected": rejected, **listed}
    )


# Batch answers list these messages by index: held for their user, or not stored at all.
_LISTED_STATUSES = (EventStatus.PENDING.value, OUTCOME_SUPPRESSED)


def _holds(workspace) -> bool:
    return workspace.anonymous_events == AnonymousEvents.HOLD
