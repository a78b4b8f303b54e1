"""The Segment endpoints' request handling, free of any web framework's request or response.

A handler takes the request's WSGI-style ``meta`` (``CONTENT_LENGTH`` and ``HTTP_*`` keys:
Django's ``request.META`` is exactly that, and so is a WSGI ``environ``) and a ``read(n)``
function for the body, and returns an ``Answer``: status, extra headers and the JSON body as
bytes. Two adapters serve them: the Django views (``segment_ingest.views``: URLs, OpenAPI
schema, test client) and the lean WSGI app in front of Django (``segment_ingest.wsgi``), so
both answer the same bytes for the same request.

Status codes follow what Segment's libraries retry: 4xx is final, 429 and 5xx are retried.
"""

import hashlib
import hmac
import json
import logging
import zlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

from django.core.serializers.json import DjangoJSONEncoder
from django.db import InterfaceError, OperationalError
from django.utils import timezone

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
    batch_context,
    check_batch,
    parse_message,
)

logger = logging.getLogger(__name__)

# SQLSTATEs that mean "busy, try again": lock wait or statement timeout, deadlock and
# serialization failures that survived the service's own retries.
_OVERLOADED_SQLSTATES = {"55P03", "57014", "40001", "40P01"}
RETRY_AFTER_SECONDS = "5"
CONTENT_TYPE = "application/json"  # what JsonResponse answered before the split

# One encoder for the process: the same bytes as JsonResponse (DjangoJSONEncoder, default
# separators) without building an encoder per answer.
_encode = DjangoJSONEncoder().encode

Meta = Mapping[str, str]
Reader = Callable[[int], bytes]


class Answer(NamedTuple):
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _answer(data: dict, status: int = 200) -> Answer:
    headers = (("Retry-After", RETRY_AFTER_SECONDS),) if status in (429, 503) else ()
    return Answer(status, headers, _encode(data).encode())


def error_answer(code: str, message: str, status: int, field: str | None = None, **extra) -> Answer:
    return _answer({"success": False, **error_body(code, message, field, **extra)}, status)


class _Rejected(Exception):
    def __init__(self, answer: Answer):
        self.answer = answer


def _read_body(meta: Meta, read: Reader, limit: int, too_large_code: str) -> bytes:
    """The request body, gunzipped when sent so, refused beyond ``limit`` bytes."""
    try:
        declared = int(meta.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit * 4:
        raise _too_large(limit, too_large_code)
    raw = read(limit * 4 + 1)
    if meta.get("HTTP_CONTENT_ENCODING", "").lower() == "gzip":
        try:
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            body = decompressor.decompress(raw, limit + 1)
        except zlib.error:
            raise _Rejected(error_answer("invalid_gzip", "the body is not valid gzip", 400)) from None
    else:
        body = raw
    if len(body) > limit:
        raise _too_large(limit, too_large_code)
    return body


def _too_large(limit: int, too_large_code: str) -> _Rejected:
    # Built only when refused: its JSON answer was encoded on every request before.
    return _Rejected(error_answer(too_large_code, f"the body may be at most {limit // 1024} KB", 413))


def _authenticate(meta: Meta, body: bytes, parsed):
    key = api_key_from_authorization(meta.get("HTTP_AUTHORIZATION", ""))
    if not key and isinstance(parsed, dict) and isinstance(parsed.get("writeKey"), str):
        key = parsed["writeKey"]
    if not key:
        raise _Rejected(
            error_answer("missing_api_key", "send your Kana API key (Basic auth, Bearer, or writeKey)", 401)
        )
    workspace = workspace_for_api_key(key)
    if workspace is None:
        raise _Rejected(error_answer("invalid_api_key", "unknown or revoked API key", 401))
    if workspace.signing_secret:
        expected = hmac.new(workspace.signing_secret.encode(), body, hashlib.sha1).hexdigest()
        if not hmac.compare_digest(expected, meta.get("HTTP_X_SIGNATURE", "").strip().lower()):
            raise _Rejected(error_answer("invalid_signature", "X-Signature does not match the body", 401))
    return workspace


def _parse_json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        return _INVALID


_INVALID = object()


def _prepare(meta: Meta, read: Reader, limit: int, too_large_code: str):
    body = _read_body(meta, read, limit, too_large_code)
    parsed = _parse_json(body)
    workspace = _authenticate(meta, body, None if parsed is _INVALID else parsed)
    if parsed is _INVALID:
        raise _Rejected(error_answer("invalid_json", "the body is not valid JSON", 400))
    if not isinstance(parsed, dict):
        raise _Rejected(error_answer("invalid_message", "the body must be a JSON object", 400))
    return workspace, parsed, len(body)


def _database_guard(handler):
    """Map refusals and database trouble to the answers Segment understands (429 and 503 are
    retried). Any other exception propagates: each adapter answers it as a logged JSON 500."""

    def guarded(meta: Meta, read: Reader) -> Answer:
        try:
            return handler(meta, read)
        except _Rejected as rejected:
            return rejected.answer
        except RetriesExhausted:
            return error_answer("conflict_retry", "Kana is busy with concurrent changes; retry shortly", 503)
        except (OperationalError, InterfaceError) as exc:
            sqlstate = getattr(exc.__cause__, "sqlstate", None)
            if sqlstate in _OVERLOADED_SQLSTATES:
                logger.warning("ingest overloaded", extra={"sqlstate": sqlstate})
                return error_answer("overloaded", "Kana is busy; retry shortly", 429)
            logger.error("database unavailable during ingest", extra={"error": type(exc).__name__})
            return error_answer("database_unavailable", "Kana's database is unavailable; retry shortly", 503)

    guarded.__name__ = handler.__name__
    return guarded


def _single(meta: Meta, read: Reader, forced_type: str | None) -> Answer:
    workspace, payload, size = _prepare(meta, read, MAX_MESSAGE_BYTES, "message_too_large")
    try:
        message = parse_message(
            payload, received_at=timezone.now(), forced_type=forced_type, size=size, hold_anonymous=_holds(workspace)
        )
    except DomainError as exc:
        return error_answer(exc.code, exc.message, exc.status, exc.field)
    outcome = ingest_messages(workspace=workspace, messages=[message])[0]
    body = {"success": True, "message_id": outcome.message_id, "status": outcome.status}
    if outcome.reason:
        body["reason"] = outcome.reason
    if outcome.warnings:
        body["warnings"] = outcome.warnings
    return _answer(body)


@_database_guard
def segment_events(meta: Meta, read: Reader) -> Answer:
    """One Segment message of any type (Kana destination, Segment webhook destination)."""
    return _single(meta, read, None)


def typed_handler(message_type: str):
    """One message of ``message_type`` (``/v1/track`` and its siblings)."""

    @_database_guard
    def handler(meta: Meta, read: Reader) -> Answer:
        return _single(meta, read, message_type)

    handler.__name__ = f"v1_{message_type}"
    return handler


MESSAGE_TYPES = ("identify", "track", "page", "screen", "group", "alias")


@_database_guard
def batch(meta: Meta, read: Reader) -> Answer:
    """``/v1/batch`` and ``/v1/import``: valid messages are applied, each rejected one is
    listed with its index and reason."""
    workspace, payload, _size = _prepare(meta, read, MAX_BATCH_BYTES, "batch_too_large")
    items = payload.get("batch")
    if not isinstance(items, list):
        return error_answer("invalid_batch", "batch must be a list of messages", 400, "batch")
    if len(items) > MAX_BATCH_MESSAGES:
        return error_answer(
            "too_many_messages", f"a batch may hold at most {MAX_BATCH_MESSAGES} messages", 400, "batch"
        )
    try:
        check_batch(payload)
    except DomainError as exc:
        return error_answer(exc.code, exc.message, exc.status, exc.field)
    received_at = timezone.now()
    hold_anonymous = _holds(workspace)
    messages, indexes, rejected = [], [], []
    fill = batch_context(payload)
    for index, item in enumerate(items):
        try:
            messages.append(parse_message(fill(item), received_at=received_at, hold_anonymous=hold_anonymous))
            indexes.append(index)
        except DomainError as exc:
            rejected.append({"index": index, **exc.as_dict()})
    if not messages and rejected:
        return error_answer("invalid_batch", "no message in the batch is valid", 400, "batch", rejected=rejected)
    outcomes = ingest_messages(workspace=workspace, messages=messages)
    # Messages answered something other than stored or replayed, by index (SPEC §12).
    held = {status: [] for status in _LISTED_STATUSES}
    for index, outcome in zip(indexes, outcomes, strict=True):
        if outcome.status in held:
            held[outcome.status].append({"index": index, "message_id": outcome.message_id})
    duplicates = sum(1 for o in outcomes if o.status == "duplicate")
    accepted = len(outcomes) - duplicates - len(held[OUTCOME_SUPPRESSED])
    listed = {status: entries for status, entries in held.items() if entries}  # present only when some are
    return _answer({"success": True, "accepted": accepted, "duplicates": duplicates, "rejected": rejected, **listed})


# Batch answers list these messages by index: held for their user, or not stored at all.
_LISTED_STATUSES = (EventStatus.PENDING.value, OUTCOME_SUPPRESSED)


def _holds(workspace) -> bool:
    return workspace.anonymous_events == AnonymousEvents.HOLD


# The handler of each path the ingest endpoints answer on, POST only (the URL conf and the
# lean WSGI app both route from it).
HANDLERS_BY_PATH: dict[str, Callable[[Meta, Reader], Answer]] = {
    "/segment/events": segment_events,
    "/v1/batch": batch,
    "/v1/import": batch,
    **{f"/v1/{message_type}": typed_handler(message_type) for message_type in MESSAGE_TYPES},
}
