"""The message times' parser (``segment_ingest.messages``) answers exactly what Django's
``parse_datetime`` made of them before the fast path: the same instant, in UTC, or the same
error (code, text, field), for awkward inputs and for generated ones.

Pure parsing: no database, so the same on SQLite and PostgreSQL.
"""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.utils import timezone as dj_timezone
from django.utils.dateparse import parse_datetime
from hypothesis import given, settings
from hypothesis import strategies as st

from kana.errors import DomainError
from segment_ingest.messages import (
    MessageError,
    _parse_time,
    _storable_json,
    _storable_size,
    check_batch,
    parse_message,
)

TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")
RECEIVED = datetime(2026, 1, 15, 10, 0, 0, 123456, tzinfo=UTC)


def reference_parse_time(payload: dict, name: str) -> datetime | None:
    """The parser as it was (main before round 9), kept here as the specification."""
    raw = payload.get(name)
    if raw is None or raw == "":
        return None
    parsed = None
    if isinstance(raw, str):
        try:
            parsed = parse_datetime(raw.strip())
        except ValueError:
            parsed = None
    if parsed is None:
        raise MessageError("invalid_timestamp", f"{name} must be an ISO 8601 date-time", name)
    if dj_timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise MessageError("invalid_timestamp", f"{name} is out of range", name) from None


def outcome(parse, *args):
    """What a parse gives, in a form where equal means the same to every caller: the instant,
    its offset and its wall-clock fields, or the error's code, text and field."""
    try:
        value = parse(*args)
    except DomainError as exc:
        return ("error", type(exc), exc.code, exc.message, exc.field, exc.status)
    if isinstance(value, datetime):
        return ("time", value, value.utcoffset(), value.replace(tzinfo=None), value.tzinfo is None)
    if hasattr(value, "occurred_at"):  # a Message
        return ("message", *outcome(lambda: value.occurred_at)[1:])
    return ("value", value)


AWKWARD = [
    # The common shapes.
    "2026-01-15T10:00:00.000Z",
    "2026-01-15T10:00:00Z",
    "2026-01-15T10:00:00+00:00",
    "2026-01-15T10:00:00-00:00",
    "2026-01-15T10:00:00.123456Z",
    "2026-01-15T10:00:00",
    # Offsets.
    "2024-05-01T12:00:00+02:00",
    "2024-05-01T12:00:00-0130",
    "2024-05-01 12:00:00.5-0130",
    "2024-05-01T12:00:00+05:30:15",
    "2024-05-01T12:00:00+05:30:15.250000",
    "2024-05-01T12:00:00+23:59",
    "2024-05-01T12:00:00+24:00",
    "2024-05-01T12:00:00 +02:00",
    "2024-05-01T12:00:00+02",
    "2024-05-01T12:00:00z",
    "2024-05-01t12:00:00Z",
    # Fractional seconds of every length, and a comma.
    "2024-05-01T12:00:00.5Z",
    "2024-05-01T12:00:00.12Z",
    "2024-05-01T12:00:00.1234Z",
    "2024-05-01T12:00:00.1234567Z",
    "2024-05-01T12:00:00.123456789Z",
    "2024-05-01T12:00:00,5Z",
    "2024-05-01T12:00:00.Z",
    # Shorter and other ISO shapes.
    "2024-05-01",
    "2024-05-01T12",
    "2024-05-01T12:00",
    "2024-05-01 12:00",
    "20240501T120000Z",
    "2024-W18-3T12:00:00Z",
    "2024-122T12:00:00Z",
    "2024-5-1T12:00:00Z",
    "2024-05-01T1:2:3Z",
    # Whitespace around.
    " 2024-05-01T12:00:00Z ",
    "\t2024-05-01T12:00:00+02:00\n",
    "\u20032024-05-01T12:00:00Z\u3000",
    # The ends of the range.
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:59:59+01:00",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59-01:00",
    "0099-01-01T00:00:00Z",
    "99999-01-01T00:00:00Z",
    # Invalid dates and times.
    "2024-13-01T00:00:00Z",
    "2024-02-30T00:00:00Z",
    "2023-02-29T00:00:00Z",
    "2024-02-29T00:00:00Z",
    "2024-05-01T24:00:00Z",
    "2024-05-01T23:60:00Z",
    "2024-05-01T23:59:60Z",
    "yesterday",
    "now",
    " ",
    "T",
    "Z",
    "1714564800",
    "2024-05-01T12:00:00Zjunk",
    "2024-05-01T12:00:00+02:00:00:00",
    # Unicode: other digits (Django's regex reads them, fromisoformat does not), letters.
    "２０２４-０５-０１T１２:００:００Z",
    "٢٠٢٤-٠٥-٠١T١٢:٠٠:٠٠Z",
    "2024-05-01T12:00:00Ｚ",
    "2024-05-01T12:00:00\u00a0Z",
    "2024-05-01T12:00:00\ud800",
    "2024-05-01T12:00:00\x00",
    "é",
    # Not text: absent, or refused.
    None,
    "",
    0,
    1,
    -1,
    1.5,
    1714564800,
    10**30,
    True,
    False,
    [],
    ["2024-05-01T12:00:00Z"],
    {},
    {"$date": "2024-05-01T12:00:00Z"},
]


@pytest.mark.parametrize("raw", AWKWARD, ids=repr)
@pytest.mark.parametrize("name", TIME_FIELDS)
def test_a_time_field_parses_as_parse_datetime_did(raw, name):
    payload = {name: raw}

    assert outcome(_parse_time, payload, name) == outcome(reference_parse_time, payload, name)


def reference_occurred_at(payload: dict) -> datetime:
    """Segment's time rules as ``parse_message`` applies them, over the reference parser,
    after the checks it makes first (text the database cannot store: NUL, lone surrogates)."""
    _storable_size(_storable_json(payload))
    times = {name: reference_parse_time(payload, name) for name in TIME_FIELDS}
    if times["timestamp"]:
        return times["timestamp"]
    original, sent = times["originalTimestamp"], times["sentAt"]
    if original and sent:
        try:
            corrected = (times["receivedAt"] or RECEIVED) - (sent - original)
        except OverflowError:
            corrected = None
        if corrected is not None and abs(corrected - RECEIVED) < timedelta(days=365 * 50):
            return corrected
    return original or RECEIVED


def track(**times) -> dict:
    return {"type": "track", "userId": "u1", "event": "Report", "messageId": "m1", **times}


def parsed_occurred_at(payload: dict) -> datetime:
    return parse_message(payload, received_at=RECEIVED).occurred_at


@pytest.mark.parametrize("raw", AWKWARD, ids=repr)
@pytest.mark.parametrize("name", TIME_FIELDS)
def test_a_message_with_an_awkward_time_happens_when_it_did_before(raw, name):
    assert outcome(parsed_occurred_at, track(**{name: raw})) == outcome(reference_occurred_at, track(**{name: raw}))


@pytest.mark.parametrize("raw", AWKWARD, ids=repr)
def test_a_batch_with_an_awkward_time_is_refused_or_kept_as_before(raw):
    def reference(batch):
        for name in ("sentAt", "receivedAt"):
            reference_parse_time(batch, name)

    assert outcome(check_batch, {"sentAt": raw}) == outcome(reference, {"sentAt": raw})
    assert outcome(check_batch, {"receivedAt": raw}) == outcome(reference, {"receivedAt": raw})


def test_the_first_invalid_time_in_field_order_is_the_one_reported():
    payload = track(timestamp="2024-05-01T12:00:00Z", originalTimestamp="nope", sentAt=5, receivedAt="never")

    with pytest.raises(MessageError) as raised:
        parse_message(payload, received_at=RECEIVED)

    assert (raised.value.code, raised.value.field) == ("invalid_timestamp", "originalTimestamp")


def test_utc_times_keep_the_utc_zone_and_others_are_converted_to_it():
    zulu = parse_message(track(timestamp="2026-01-15T10:00:00.000Z"), received_at=RECEIVED).occurred_at
    offset = parse_message(track(timestamp="2026-01-15T12:00:00+02:00"), received_at=RECEIVED).occurred_at
    naive = parse_message(track(timestamp="2026-01-15T10:00:00"), received_at=RECEIVED).occurred_at

    assert zulu == offset == naive == datetime(2026, 1, 15, 10, tzinfo=UTC)
    assert zulu.tzinfo is offset.tzinfo is naive.tzinfo is UTC


# Generated: date-times written in the shapes ISO 8601 allows (separator, precision, offset,
# whitespace), and arbitrary text.
_offsets = st.one_of(
    st.none(),
    st.just(UTC),
    st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)).map(
        lambda delta: timezone(delta)
    ),
)


def _write(moment: datetime, sep: str, spec: str, zulu: bool, pad: str) -> str:
    text = moment.isoformat(sep=sep, timespec=spec)
    return pad + (text.replace("+00:00", "Z") if zulu else text) + pad


_written = st.builds(
    _write,
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=_offsets),
    st.sampled_from(["T", " ", "t"]),
    st.sampled_from(["auto", "hours", "minutes", "seconds", "milliseconds", "microseconds"]),
    st.booleans(),
    st.sampled_from(["", " ", "\t", "\n"]),
)


@settings(max_examples=400, deadline=None)
@given(raw=st.one_of(_written, st.text(max_size=40), st.text(alphabet="0123456789-:.TZ+ ,Wz", max_size=32)))
def test_generated_times_parse_as_parse_datetime_did(raw):
    for name in TIME_FIELDS:
        assert outcome(_parse_time, {name: raw}, name) == outcome(reference_parse_time, {name: raw}, name)
    assert outcome(parsed_occurred_at, track(timestamp=raw)) == outcome(reference_occurred_at, track(timestamp=raw))
