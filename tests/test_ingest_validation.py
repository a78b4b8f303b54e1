"""Bad input: a 4xx with a clear ``code``, nothing written, never a 5xx (SPEC §3)."""

import gzip
import json

import pytest
from django.utils import timezone

from features.models import Event, EventStatus
from segment_ingest.messages import MAX_NESTING_DEPTH, MessageError, parse_message

from .identity_support import counts, ok, user_for


def refused(segment, tenant, path, body, *, status=400, code, field=None, **headers):
    before = counts(tenant)
    response = segment.post(path, body, **headers)
    assert response.status_code == status, response.content
    answer = response.json()
    assert answer["success"] is False
    assert answer["code"] == code and answer["message"]
    if field is not None:
        assert answer["field"] == field
    assert counts(tenant) == before, "a refused request wrote something"
    return answer


TRACK = {"type": "track", "userId": "1", "event": "Report"}


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe{}", b'{"userId": "1",}', b"[" * 20000])
def test_invalid_json_is_refused(segment, tenant, body):
    refused(segment, tenant, "/v1/track", body, code="invalid_json")


@pytest.mark.parametrize("body", [b"[]", b'"track"', b"42", b"null"])
def test_a_body_that_is_not_an_object_is_refused(segment, tenant, body):
    refused(segment, tenant, "/segment/events", body, code="invalid_message")


@pytest.mark.parametrize(
    "path, message, code, field",
    [
        ("/v1/identify", {"userId": "1", "traits": ["name"]}, "invalid_type", "traits"),
        ("/v1/identify", {"userId": "1", "traits": "Ann"}, "invalid_type", "traits"),
        ("/v1/identify", {"userId": "1", "context": "web"}, "invalid_type", "context"),
        ("/v1/identify", {"userId": {"id": 1}}, "invalid_type", "userId"),
        ("/v1/track", {"userId": ["1"], "event": "E"}, "invalid_type", "userId"),
        ("/v1/track", {"userId": "1", "event": "E", "properties": [1]}, "invalid_type", "properties"),
        ("/v1/track", {"userId": "1", "event": "E", "timestamp": "yesterday"}, "invalid_timestamp", "timestamp"),
        ("/v1/track", {"userId": "1", "event": "E", "timestamp": 1714557600}, "invalid_timestamp", "timestamp"),
        ("/v1/track", {"userId": "1", "event": "E", "sentAt": "2024-13-40T00:00:00Z"}, "invalid_timestamp", "sentAt"),
        (
            "/v1/track",
            {"userId": "1", "event": "E", "timestamp": "9999-12-31T23:00:00-10:00"},
            "invalid_timestamp",
            None,
        ),
        ("/v1/track", {"userId": "1", "event": "E", "messageId": 7}, "invalid_type", "messageId"),
        ("/v1/track", {"userId": "1", "event": "E", "messageId": "m" * 101}, "invalid_value", "messageId"),
        ("/v1/track", {"userId": "1", "event": "E" * 201}, "invalid_value", "event"),
        ("/v1/track", {"userId": "u" * 256, "event": "E"}, "invalid_value", "userId"),
        ("/v1/track", {"userId": "1"}, "missing_event", "event"),
        ("/v1/track", {"userId": "1", "event": "   "}, "missing_event", "event"),
        ("/v1/track", {"event": "E"}, "anonymous_event", "userId"),
        ("/v1/page", {"name": "Pricing"}, "anonymous_event", "userId"),
        ("/v1/page", {"userId": "1", "name": ["Pricing"]}, "invalid_type", "name"),
        ("/v1/identify", {"traits": {"email": "x@example.com"}}, "missing_user_id", "userId"),
        ("/v1/group", {"userId": "1"}, "missing_group_id", "groupId"),
        ("/v1/alias", {"userId": "1"}, "missing_previous_id", "previousId"),
        ("/segment/events", {"userId": "1", "event": "E"}, "unsupported_type", "type"),
        ("/segment/events", {"type": "purchase", "userId": "1"}, "unsupported_type", "type"),
        ("/segment/events", {"type": ["track"], "userId": "1"}, "unsupported_type", "type"),
    ],
)
def test_an_invalid_message_is_refused_with_its_code(segment, tenant, path, message, code, field):
    refused(segment, tenant, path, message, code=code, field=field)


@pytest.mark.parametrize(
    "properties, code",
    [
        ('{"note": "a\\u0000b"}', "invalid_character"),
        ('{"a\\u0000": 1}', "invalid_character"),
        ('{"note": "\\ud800"}', "invalid_character"),
        ('{"x": NaN}', "invalid_number"),
        ('{"x": -Infinity}', "invalid_number"),
        ('{"x": 1e999}', "invalid_number"),
        ('{"x": ' + "[" * (MAX_NESTING_DEPTH + 5) + "]" * (MAX_NESTING_DEPTH + 5) + "}", "too_deeply_nested"),
    ],
    ids=["nul", "nul-in-key", "lone-surrogate", "nan", "infinity", "overflowing-float", "deep"],
)
def test_values_the_database_cannot_store_are_refused(segment, tenant, properties, code):
    body = '{"userId": "1", "event": "E", "properties": ' + properties + "}"

    refused(segment, tenant, "/v1/track", body, code=code)
    in_batch = '{"batch": [' + body[:-1] + ', "type": "track"}, {"type": "track", "userId": "2", "event": "E"}]}'
    answer = ok(segment.post("/v1/batch", in_batch))
    assert answer["accepted"] == 1
    assert [(r["index"], r["code"]) for r in answer["rejected"]] == [(0, code)]
    assert Event.objects.get().external_user_id == "2"


def test_text_that_only_looks_like_an_escape_is_fine(segment, tenant):
    body = ok(segment.track("1", "E", {"note": "C:\\u0000dir", "deep": [[[[{"ok": True}]]]]}))

    assert Event.objects.get(message_id=body["message_id"]).properties["note"] == "C:\\u0000dir"


def test_a_message_over_32_kb_is_too_large(segment, tenant):
    message = {**TRACK, "properties": {"blob": "x" * (32 * 1024)}}

    refused(segment, tenant, "/v1/track", message, status=413, code="message_too_large")
    refused(segment, tenant, "/segment/events", message, status=413, code="message_too_large")


def test_a_message_just_under_32_kb_is_accepted(segment, tenant):
    message = {**TRACK, "properties": {"blob": ""}}
    message["properties"]["blob"] = "x" * (32 * 1024 - len(json.dumps(message)) - 10)

    ok(segment.post("/v1/track", message))


def test_a_batch_over_500_kb_is_too_large(segment, tenant):
    messages = [{**TRACK, "properties": {"blob": "x" * (20 * 1024)}} for _ in range(26)]

    refused(segment, tenant, "/v1/batch", {"batch": messages}, status=413, code="batch_too_large")


def test_a_gzipped_batch_over_500_kb_once_unzipped_is_too_large(segment, tenant):
    body = gzip.compress(json.dumps({"batch": [{**TRACK, "properties": {"blob": "x" * 600_000}}]}).encode())
    assert len(body) < 10_000

    refused(segment, tenant, "/v1/batch", body, status=413, code="batch_too_large", HTTP_CONTENT_ENCODING="gzip")


def test_a_batch_of_more_than_2500_messages_is_refused(segment, tenant):
    messages = [{"type": "track", "userId": "1", "event": "E"}] * 2501

    refused(segment, tenant, "/v1/batch", {"batch": messages}, code="too_many_messages", field="batch")


@pytest.mark.parametrize("batch", [None, {}, "messages", 3])
def test_a_batch_without_a_list_is_refused(segment, tenant, batch):
    refused(segment, tenant, "/v1/batch", {"batch": batch}, code="invalid_batch", field="batch")


def test_bad_gzip_is_refused(segment, tenant):
    refused(
        segment, tenant, "/v1/track", b"\x1f\x8b not gzip at all", code="invalid_gzip", HTTP_CONTENT_ENCODING="gzip"
    )


def test_a_gzipped_body_is_accepted(segment, tenant):
    body = gzip.compress(json.dumps({"userId": "1", "event": "Zipped"}).encode())

    ok(segment.post("/v1/track", body, HTTP_CONTENT_ENCODING="gzip"))

    assert Event.objects.get().name == "Zipped"


def test_a_batch_stores_its_valid_messages_and_lists_each_rejected_one(segment, tenant):
    messages = [
        {"type": "identify", "userId": "1", "traits": {"name": "Ann"}},
        {"type": "track", "event": "No User"},
        {"type": "track", "userId": "1", "event": "Report"},
        "not an object",
        {"type": "teleport", "userId": "1"},
        {"type": "identify", "userId": "null"},
        {"type": "track", "userId": "1", "event": "Big", "properties": {"blob": "x" * 33_000}},
        {"type": "page", "userId": "1", "name": "Pricing"},
    ]

    body = ok(segment.batch(messages))

    assert body["accepted"] == 3 and body["duplicates"] == 0
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [
        (1, "anonymous_event"),
        (3, "invalid_message"),
        (4, "unsupported_type"),
        (5, "missing_user_id"),
        (6, "message_too_large"),
    ]
    assert all(r["message"] for r in body["rejected"])
    assert sorted(Event.objects.values_list("type", "name")) == [
        ("identify", ""),
        ("page", "Viewed Pricing Page"),
        ("track", "Report"),
    ]
    assert user_for(tenant, "1").name == "Ann"


def test_a_batch_with_no_valid_message_is_a_400_listing_them(segment, tenant):
    answer = refused(segment, tenant, "/v1/batch", {"batch": [{"type": "track"}, {"type": "x"}]}, code="invalid_batch")

    assert [(r["index"], r["code"]) for r in answer["rejected"]] == [(0, "anonymous_event"), (1, "unsupported_type")]


def test_an_empty_batch_is_accepted(segment, tenant):
    assert ok(segment.batch([])) == {"success": True, "accepted": 0, "duplicates": 0, "rejected": []}


@pytest.mark.parametrize(
    "message, status, name",
    [
        ({"type": "identify", "userId": "1", "traits": {"name": "Ann"}}, EventStatus.PROCESSED, ""),
        ({"type": "track", "userId": "1", "event": "Report"}, EventStatus.UNMAPPED, "Report"),
        ({"type": "page", "userId": "1", "name": "Pricing"}, EventStatus.UNMAPPED, "Viewed Pricing Page"),
        ({"type": "screen", "userId": "1", "name": "Home"}, EventStatus.UNMAPPED, "Viewed Home Screen"),
        ({"type": "page", "userId": "1", "properties": {"name": "Docs"}}, EventStatus.UNMAPPED, "Viewed Docs Page"),
        ({"type": "screen", "userId": "1"}, EventStatus.UNMAPPED, "Viewed Screen"),
        ({"type": "group", "userId": "1", "groupId": "acme"}, EventStatus.PROCESSED, ""),
        ({"type": "alias", "userId": "1", "previousId": "anon"}, EventStatus.PROCESSED, ""),
    ],
)
def test_segment_events_accepts_every_type(segment, tenant, message, status, name):
    body = ok(segment.post("/segment/events", message))

    event = Event.objects.get(message_id=body["message_id"])
    assert (event.type, event.status, event.name) == (message["type"], status, name)
    assert event.user_id == user_for(tenant, "1").pk
    assert body["message_id"].startswith("kana-")  # none was sent: one is assigned


def test_the_typed_endpoint_decides_the_type(segment, tenant):
    ok(segment.post("/v1/track", {"type": "identify", "userId": "1", "event": "Report"}))

    assert Event.objects.get().type == "track"


def test_nesting_deep_enough_to_break_json_encoders_is_a_400(segment, tenant):
    deep = '{"userId": "1", "event": "E", "properties": {"x": ' + "[" * 900 + "]" * 900 + "}}"
    deeper = '{"batch": [' + "[" * 20000 + "]" * 20000 + "]}"

    refused(segment, tenant, "/v1/track", deep, code="too_deeply_nested")
    refused(segment, tenant, "/v1/batch", deeper, code="invalid_json")


def _nest(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"x": [float("nan"), *([[]] * 70)]}, None),  # many brackets, shallow: only the NaN counts
        ({"x": [float("nan")], "y": _nest(MAX_NESTING_DEPTH + 1)}, "too_deeply_nested"),  # depth is reported first
        ({"type": "track", "note": "{[" * 100, "y": _nest(MAX_NESTING_DEPTH - 1)}, "ok"),  # brackets in text
        ({"type": "track", "y": _nest(MAX_NESTING_DEPTH)}, "too_deeply_nested"),
    ],
    ids=["nan-shallow", "nan-and-deep", "brackets-in-strings", "one-level-too-deep"],
)
def test_the_depth_limit_is_exact_whatever_else_the_message_holds(payload, code):
    payload = {"userId": "1", "event": "E", "messageId": "m", **payload}
    if code == "ok":
        message = parse_message(payload, received_at=timezone.now(), forced_type="track")
        assert json.loads(message.payload_text()) == payload
        return
    with pytest.raises(MessageError) as raised:
        parse_message(payload, received_at=timezone.now(), forced_type="track")
    assert raised.value.code == (code or "invalid_number")
