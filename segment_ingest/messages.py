"""Parsing and validating Segment messages (Segment spec, HTTP Tracking API).

Pure functions: no database. A message either becomes a ``Message`` or raises
``MessageError`` with the code, text and field the client gets back.
"""

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from django.utils.dateparse import parse_datetime

from features.incoming import Message, compact_json
from features.models import MessageType
from kana.errors import DomainError
from users.identifiers import clean_identifier

MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_MESSAGES = 2500
MAX_MESSAGE_ID_LENGTH = 100
MAX_EVENT_NAME_LENGTH = 200
# Far deeper than any analytics payload, and far below Python's recursion limit, which the
# JSON encoders (ours, the database driver's) hit around 900 levels: a 500, not a 400.
MAX_NESTING_DEPTH = 64
# Ids sent as JSON numbers are exact up to 2**53 (JavaScript's and most decoders' limit);
# a larger one has already lost digits on its way: it must come as text.
MAX_EXACT_NUMBER = 2**53
_ID_FIELDS = ("userId", "previousId", "groupId")
_TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")
# ``MessageType.values`` builds a new list on every access: this runs once per message.
_MESSAGE_TYPES = frozenset(MessageType.values)
# The types as plain text: reading a member off the enum class costs ≈ 0.15 µs each time
# (comparing it to the type is the same either way: members are str).
_IDENTIFY, _TRACK, _PAGE = MessageType.IDENTIFY.value, MessageType.TRACK.value, MessageType.PAGE.value
_GROUP, _ALIAS = MessageType.GROUP.value, MessageType.ALIAS.value
_VIEWS = frozenset({MessageType.PAGE.value, MessageType.SCREEN.value})
# ``int | float`` builds a union object at every evaluation; JSON numbers are these two.
_NUMBERS = (int, float)


class MessageError(DomainError):
    """A Segment message Kana refuses (4xx: Segment does not retry it)."""


def _parse_time(payload: dict, name: str) -> datetime | None:
    raw = payload.get(name)
    if raw is None or raw == "":
        return None
    return _time_value(raw, name)


def _time_value(raw: Any, name: str) -> datetime:
    """A present time field in UTC: Django's ``parse_datetime``, taken apart so the common case
    (an ISO 8601 text in UTC, which ``datetime.fromisoformat`` reads) costs one C call.

    ``parse_datetime`` tries ``fromisoformat`` first and its own regex only when that fails, so
    trying ``fromisoformat`` here and ``parse_datetime`` after a failure gives the same answer
    for every input (tests/test_ingest_time_parsing.py holds them equal over awkward and generated ones)."""
    parsed = None
    if isinstance(raw, str):
        text = raw.strip()
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            try:
                parsed = parse_datetime(text)
            except ValueError:
                parsed = None
    if parsed is None:
        raise MessageError("invalid_timestamp", f"{name} must be an ISO 8601 date-time", name)
    tzinfo = parsed.tzinfo
    if tzinfo is UTC:  # "Z" or "+00:00": already what is stored (``astimezone`` would return it)
        return parsed
    if tzinfo is None or parsed.utcoffset() is None:  # ``timezone.is_naive``
        parsed = parsed.replace(tzinfo=UTC)
    try:
        # In UTC, so stored times and the "set at" stamps kept as text compare correctly.
        return parsed.astimezone(UTC)
    except OverflowError:
        raise MessageError("invalid_timestamp", f"{name} is out of range", name) from None


def occurred_at(payload: dict, received_at: datetime) -> datetime:
    """When the event happened (Segment's rules): ``timestamp``; else the device time
    corrected for its clock skew, ``receivedAt - (sentAt - originalTimestamp)``; else
    ``originalTimestamp``; else when Kana received it."""
    return _occurred_at({name: _parse_time(payload, name) for name in _TIME_FIELDS}, received_at)


def _occurred_at(times: dict[str, datetime | None], received_at: datetime) -> datetime:
    """``occurred_at`` from the message's times parsed already (``_TIME_FIELDS``)."""
    timestamp = times["timestamp"]
    if timestamp:
        return timestamp
    original = times["originalTimestamp"]
    sent = times["sentAt"]
    if original and sent:
        segment_received = times["receivedAt"] or received_at
        try:
            corrected = segment_received - (sent - original)
        except OverflowError:  # absurd clocks: past year 9999 or before year 1
            corrected = None
        if corrected is not None and abs(corrected - received_at) < timedelta(days=365 * 50):
            return corrected
    return original or received_at


def _object(payload: dict, name: str) -> dict:
    value = payload.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MessageError("invalid_type", f"{name} must be an object", name)
    return value


def _required_user(payload: dict, code: str, what: str) -> str:
    user_id = clean_identifier(payload.get("userId"), "userId")
    if user_id is None:
        raise MessageError(code, f"{what} needs a userId (anonymous events are not accepted)", "userId")
    return user_id


def _anonymous_id(payload: dict) -> str | None:
    # Kana stored anonymousId without reading it before workspaces could hold anonymous
    # events: one it cannot use (not text, too long) is absent, not a reason to refuse.
    try:
        return clean_identifier(payload.get("anonymousId"), "anonymousId")
    except DomainError:
        return None


def _usage_user(message: Message, payload: dict, what: str, hold_anonymous: bool) -> None:
    """A track/page/screen's userId; without one, its anonymousId when the workspace holds
    anonymous events (SPEC §12), else Kana's 400 ``anonymous_event``."""
    user_id = clean_identifier(payload.get("userId"), "userId")
    if user_id is None and hold_anonymous and message.anonymous_id is not None:
        return
    message.user_id = user_id or _required_user(payload, "anonymous_event", what)


# An escaped NUL in JSON text: \u0000 after an even number of backslashes (an odd number
# would make it the literal characters "\u0000", which are fine).
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _too_deep(payload: dict) -> bool:
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _storable_json(payload: dict) -> str:
    """The message as compact JSON; refuses what the database cannot store.

    PostgreSQL rejects NUL characters in text and jsonb, NaN and Infinity in jsonb, and no
    database takes lone UTF-16 surrogates: checked here so such input is a 400, never a 500.
    The text is what PostgreSQL ingest stores (jsonb), so it is encoded once per message.
    """
    try:
        text = compact_json(payload)
    except RecursionError:
        raise _too_deep_error() from None
    except ValueError:
        if _too_deep(payload):  # the depth error comes first, as if checked before encoding
            raise _too_deep_error() from None
        raise MessageError("invalid_number", "numbers must be finite (no NaN or Infinity)") from None
    # Fewer brackets than the limit cannot nest deeper than it: the walk is for the rest.
    if text.count("{") + text.count("[") > MAX_NESTING_DEPTH and _too_deep(payload):
        raise _too_deep_error()
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise MessageError("invalid_character", "text may not contain NUL characters (\\u0000)")
    return text


def _too_deep_error() -> MessageError:
    # Built when raised: an exception object per message costs more than the check it reports.
    return MessageError("too_deeply_nested", f"a message may nest at most {MAX_NESTING_DEPTH} levels deep")


def _storable_size(text: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise MessageError("invalid_character", "text may not contain unpaired UTF-16 surrogates") from None


def parse_message(
    payload: Any,
    *,
    received_at: datetime,
    forced_type: str | None = None,
    size: int | None = None,
    hold_anonymous: bool = False,
) -> Message:
    """Validate one message. ``forced_type`` is the type the endpoint path names;
    ``size`` the raw size of a message sent alone (else its compact JSON size counts);
    ``hold_anonymous``: the workspace holds track/page/screen calls that only have an
    anonymousId (its ``anonymous_events`` setting) instead of refusing them."""
    if not isinstance(payload, dict):
        raise MessageError("invalid_message", "a message must be a JSON object")
    _check_write_key(payload)  # before encoding: the key is not stored with the event
    if size is not None and size > MAX_MESSAGE_BYTES:
        raise MessageError("message_too_large", f"a message may be at most {MAX_MESSAGE_BYTES // 1024} KB", status=413)
    text = _storable_json(payload)
    compact_size = _storable_size(text)
    if size is None:
        size = compact_size
    if size > MAX_MESSAGE_BYTES:
        raise MessageError("message_too_large", f"a message may be at most {MAX_MESSAGE_BYTES // 1024} KB", status=413)
    message_type = forced_type or payload.get("type")
    if not isinstance(message_type, str) or message_type not in _MESSAGE_TYPES:
        raise MessageError(
            "unsupported_type",
            "type must be one of identify, track, page, screen, group, alias",
            "type",
        )
    raw_id = payload.get("messageId")
    if raw_id is None or raw_id == "":
        message_id = f"kana-{uuid.uuid4()}"
        payload["messageId"] = message_id
        text = ""  # stale: encoded again if needed
    elif not isinstance(raw_id, str):
        raise MessageError("invalid_type", "messageId must be a string", "messageId")
    elif len(raw_id) > MAX_MESSAGE_ID_LENGTH:
        raise MessageError("invalid_value", f"messageId is longer than {MAX_MESSAGE_ID_LENGTH} characters", "messageId")
    else:
        message_id = raw_id
    if forced_type and payload.get("type") != forced_type:
        payload["type"] = forced_type
        text = ""
    # Each checked, also those a timestamp makes unused; parsed once, here. (Inline rather
    # than through ``_parse_time``: this runs for four fields of every message.)
    times = {}
    for name in _TIME_FIELDS:
        raw = payload.get(name)
        times[name] = None if raw is None or raw == "" else _time_value(raw, name)
    for name in _ID_FIELDS:
        value = payload.get(name)
        if isinstance(value, _NUMBERS) and not isinstance(value, bool) and abs(value) >= MAX_EXACT_NUMBER:
            raise MessageError("invalid_value", f"{name} is too large a number: send it as text", name)
    message = Message(
        type=message_type,
        message_id=message_id,
        payload=payload,
        payload_json=text,
        occurred_at=_occurred_at(times, received_at),
        received_at=received_at,
        anonymous_id=_anonymous_id(payload),
    )
    # Kept on the event as sent: Segment sends objects, and the dashboard reads them as such.
    _object(payload, "context")
    _object(payload, "integrations")
    if message_type == _IDENTIFY:
        message.user_id = _required_user(payload, "missing_user_id", "an identify")
        message.traits = _object(payload, "traits")
    elif message_type == _TRACK:
        _usage_user(message, payload, "a track event", hold_anonymous)
        name = payload.get("event")
        if not isinstance(name, str) or not name.strip():
            raise MessageError("missing_event", "a track call needs an event name", "event")
        if len(name) > MAX_EVENT_NAME_LENGTH:
            raise MessageError("invalid_value", f"event is longer than {MAX_EVENT_NAME_LENGTH} characters", "event")
        message.name = name.strip()
        message.properties = _object(payload, "properties")
    elif message_type in _VIEWS:
        _usage_user(message, payload, f"a {message_type} call", hold_anonymous)
        message.properties = _object(payload, "properties")
        label = payload.get("name")
        if label is not None and not isinstance(label, str):
            raise MessageError("invalid_type", "name must be a string", "name")
        if not label:
            # properties.name is a property like any other: used only when it is text.
            fallback = message.properties.get("name")
            label = fallback if isinstance(fallback, str) else ""
        label = label.strip()[:150]
        # Kissmetrics' convention, so rules can map page and screen views by name.
        suffix = "Page" if message_type == _PAGE else "Screen"
        message.name = f"Viewed {label} {suffix}" if label else f"Viewed {suffix}"
    elif message_type == _GROUP:
        message.user_id = _required_user(payload, "missing_user_id", "a group call")
        message.group_id = clean_identifier(payload.get("groupId"), "groupId")
        if message.group_id is None:
            raise MessageError("missing_group_id", "a group call needs a groupId", "groupId")
        message.traits = _object(payload, "traits")
    elif message_type == _ALIAS:
        message.user_id = _required_user(payload, "missing_user_id", "an alias call")
        message.previous_id = clean_identifier(payload.get("previousId"), "previousId")
        if message.previous_id is None:
            raise MessageError("missing_previous_id", "an alias call needs a previousId", "previousId")
        if message.previous_id == message.user_id:
            raise MessageError("invalid_value", "previousId and userId are the same", "previousId")
    return message


def _check_write_key(payload: dict) -> None:
    """``writeKey`` is the API key as text (the edge reads it); then it is not kept."""
    key = payload.pop("writeKey", None)
    if key is not None and not isinstance(key, str):
        raise MessageError("invalid_type", "writeKey must be a string", "writeKey")


def check_batch(batch: dict) -> None:
    """The batch's own fields, which fill its messages' (``batch_context``): refused
    when invalid, even where every message has its own, as a message's would be."""
    _check_write_key(batch)
    for name in ("context", "integrations"):
        _object(batch, name)
    for name in ("sentAt", "receivedAt"):
        _parse_time(batch, name)


def batch_context(batch: dict) -> Callable[[Any], Any]:
    """What fills each message of ``batch``: the batch-level ``context`` and ``integrations``
    fill what a message lacks (a dict merged under the message's own), and its ``sentAt`` and
    ``receivedAt`` stand for the message's when it has none. What the batch holds is read
    once here, not again for each of its messages."""
    shared = [(key, value) for key in ("context", "integrations") if isinstance(value := batch.get(key), dict)]
    times = [(key, batch[key]) for key in ("sentAt", "receivedAt") if key in batch]

    def fill(message: Any) -> Any:
        if not isinstance(message, dict):
            return message
        for key, value in shared:
            own = message.get(key)
            if own is None:
                message[key] = dict(value)
            elif isinstance(own, dict):
                message[key] = {**value, **own}
        for key, value in times:
            if key not in message:
                message[key] = value
        return message

    return fill
