"""A consume's app-side shortcuts give what the steps they replace give (docs/performance-history.md,
"Round 16: s7app"): the lean front's body read (``api.lean._parsed``) and answer rendering
(``api.lean._rendered``) against DRF's ``JSONParser`` and ``JSONRenderer``, and a consume's
remembered period (``entitlements.access._period_at``) against ``period_containing``."""

import io
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from rest_framework.exceptions import ParseError

from api import lean
from entitlements import access
from entitlements.periods import DAY, MONTH, NEVER, WEEK, YEAR, period_containing
from features.models import Usage

from .api_support import ApiClient, feature, identify
from .entitlement_support import consume, package, subscribe

BODIES = [
    b'{"user_id":"u1","feature":"messages","delta":1,"idempotency_key":"k1"}',
    '{"user_id": "caf\u00e9 \u2028", "feature": "\U0001f600"}'.encode(),
    b'{"delta": 1.5e3, "a": [1, null, true, {"b": "\\u00e9\\ud83d\\ude00"}]}',
    b'"a text"',
    b"[1, 2]",
    b"  {}  ",
    b'{"delta": NaN}',  # DRF's strict JSON refuses NaN and the infinities
    b'{"delta": -Infinity}',
    b'{"delta": 1',  # not JSON
    b'{"a": 1} {"b": 2}',  # extra data
    b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark: refused
    b'{"a": "\xff"}',  # not UTF-8
    b'{"a": 1}\xe2\x82',  # a truncated last character: DRF's stream reader drops it
    b'{"a": "\xe2\x82"}',  # a truncated character inside
    b"",
]


def _drf_parse(body: bytes):
    try:
        return lean._parser.parse(io.BytesIO(body), None, {"encoding": "utf-8"})
    except ParseError as exc:
        return ("refused", exc.detail)


@pytest.mark.parametrize("body", BODIES)
def test_the_body_is_read_as_drfs_parser_reads_it(body):
    try:
        got = lean._parsed(body)
    except ParseError as exc:
        got = ("refused", exc.detail)
    assert got == _drf_parse(body)


ANSWERS = [
    {"access": True, "reason": "within_limit", "consumption": {"used": 1, "budget": 2.5, "held": 0}, "period": None},
    {"text": 'caf\u00e9 \u2028 \u2029 \U0001f600 " \\ \n \x00', "list": [1, -2.5, 1e300, None, False]},
    {"decimal": Decimal("1.500"), "when": datetime(2026, 1, 31, 12, 0, tzinfo=UTC), "nested": {"a": [{}]}},
    [],
    "a text",
    None,
]


@pytest.mark.parametrize("data", ANSWERS)
def test_an_answer_is_rendered_as_drfs_renderer_renders_it(data):
    assert lean._rendered(data) == lean._render(data)


def test_an_answer_drf_refuses_to_render_is_refused_the_same():
    for data in ({"x": float("nan")}, {"x": float("inf")}, {"x": object()}):
        with pytest.raises(ValueError if isinstance(data["x"], float) else TypeError) as drf:
            lean._render(data)
        with pytest.raises(drf.type) as ours:
            lean._rendered(data)
        assert str(ours.value) == str(drf.value)


ANCHORS = [
    datetime(2024, 1, 31, 23, 30, tzinfo=UTC),  # month ends: Feb 29, Mar 31, Apr 30
    datetime(2024, 2, 29, 6, 0, tzinfo=UTC),  # a leap day: Feb 28 in other years
    datetime(2025, 6, 15, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-5))),  # not UTC
]


@pytest.mark.parametrize("reset_period", [DAY, WEEK, MONTH, YEAR, NEVER])
def test_a_remembered_period_is_the_one_period_containing_gives(reset_period, monkeypatch):
    monkeypatch.setattr(access, "_PERIODS", {})
    for anchor in ANCHORS:
        # Forwards through several periods in uneven steps, on boundaries and a microsecond
        # either side of them, then backwards (a clock set back), and before the anchor.
        moments = [anchor + timedelta(hours=7 * n + n * n) for n in range(0, 260, 3)]
        for start, end in [period_containing(anchor, reset_period, m) for m in moments[::9]]:
            if end is not None:
                moments += [end - timedelta(microseconds=1), end, end + timedelta(microseconds=1)]
            moments += [start - timedelta(microseconds=1), start]
        moments += sorted(moments, reverse=True) + [anchor - timedelta(days=400)]
        for at in moments:
            assert access._period_at(anchor, reset_period, at) == period_containing(anchor, reset_period, at), at
    assert all(end is not None for _, end in access._PERIODS.values())


def test_the_remembered_periods_are_bounded(monkeypatch):
    monkeypatch.setattr(access, "_PERIODS", {})
    monkeypatch.setattr(access, "_PERIODS_MAX", 3)
    at = datetime(2026, 5, 1, tzinfo=UTC)
    for day in range(10):
        anchor = datetime(2026, 1, 1 + day, tzinfo=UTC)
        assert access._period_at(anchor, MONTH, at) == period_containing(anchor, MONTH, at)
        assert len(access._PERIODS) <= 3


@pytest.mark.django_db(transaction=True)
def test_a_known_spent_subjects_changed_offers_are_decided_on_as_they_are_now(tenant):
    """The offers read beside a spent budget's read are checked against the ones that read was
    made for: a subscription added, or one past due or cancelled, since the subject was found
    spent is decided on as it is now (as a process that never saw the subject decides)."""
    feature(tenant, "messages")
    identify(tenant, "u1")
    package(tenant, "small", {"feature": "messages", "limit": 1})
    package(tenant, "big", {"feature": "messages", "limit": 3}, is_addon=True)
    small = subscribe(tenant, "small", user_id="u1")
    assert consume(tenant, "u1", "messages", "k1").json()["recorded"] is True
    for key in ("k2", "k3"):  # spent: the second is the one-round-trip refusal
        refused = consume(tenant, "u1", "messages", key).json()
        assert (refused["reason"], refused["consumption"]["budget"]) == ("limit_reached", 1)
    # Known spent where the consume is pipelined (PostgreSQL); elsewhere the same answers.
    assert any(subject[1] == "u1" for subject in access._SPENT_OFFERS) == access.pipelined.available()

    big = subscribe(tenant, "big", user_id="u1")  # its own period, from now
    for n, key in enumerate(("k4", "k5", "k6"), start=1):
        granted = consume(tenant, "u1", "messages", key).json()
        assert (granted["recorded"], granted["consumption"]["used"], granted["consumption"]["budget"]) == (True, n, 3)
    for key in ("k7", "k8"):
        refused = consume(tenant, "u1", "messages", key).json()
        assert (refused["reason"], refused["consumption"]["budget"]) == ("limit_reached", 3)

    response = ApiClient(tenant).patch(f"subscriptions/{big['id']}", {"status": "past_due"})
    assert response.status_code == 200, response.content
    refused = consume(tenant, "u1", "messages", "k9").json()  # the small package's budget again
    assert (refused["reason"], refused["consumption"]["budget"]) == ("limit_reached", 1)
    response = ApiClient(tenant).patch(f"subscriptions/{small['id']}", {"status": "cancelled"})
    assert response.status_code == 200, response.content
    refused = consume(tenant, "u1", "messages", "k10").json()
    assert (refused["reason"], refused["consumption"]) == ("subscription_inactive", None)
    assert Usage.objects.filter(event__message_id__startswith="k").count() == 4
