"""Issue 15, items 1 and 3: amounts and numbers that used to answer 500 at ingest.

Usage amounts are stored as numeric(30, 9): anything below 10^21 in absolute value fits (after
rounding to 9 decimals) and is recorded exactly; a number beyond it is refused for that event
only (stored unmapped, reason ``invalid_amount``), never a 500 for the whole request or batch.
A number too large for a float (beyond ~1.8e308) never matches a numeric comparison.
"""

from decimal import Decimal

import pytest

from features.models import Event, EventStatus, UnmappedReason, Usage
from features.rules import InvalidRule, clean_conditions, condition_matches, parse_amount
from tests.api_support import ApiClient
from tests.conftest import is_postgres
from tests.usage_support import make_feature, make_rule

FITS = [
    (9999999999999999999, Decimal("9999999999999999999")),
    (1e19, Decimal("1E19")),
    (1e20, Decimal("1E20")),
    ("1e20", Decimal("1E20")),
    (-1e20, Decimal("-1E20")),
    (999999999999999999999.999999999, None),  # a float: whatever it rounds to, it fits or is refused
    ("999999999999999000000.123456789", Decimal("999999999999999000000.123456789")),
    ("1e-12", Decimal("0")),
]
# The last two: within a float's step of 10^21, which SQLite (floats) would store as 1e21.
TOO_LARGE = [
    1e21,
    -1e21,
    10**25,
    "1e21",
    "1e999999999",
    10**400,
    "999999999999999999999.999999999",
    999999999999999999999,
]


def _delta_body(delta) -> dict:
    return {"userId": "u", "event": "e", "properties": {"featureId": "fz", "delta": delta}}


@pytest.mark.parametrize("delta,expected", FITS)
def test_it_parses_every_amount_the_column_holds(delta, expected):
    amount = parse_amount(delta)
    if expected is None:
        assert amount is None or abs(amount) < Decimal(10) ** 21
    else:
        assert amount == expected


@pytest.mark.parametrize("delta", TOO_LARGE)
def test_it_refuses_amounts_beyond_the_column_without_raising(delta):
    assert parse_amount(delta) is None


def test_it_records_amounts_between_1e19_and_1e21(segment, tenant):
    make_feature(tenant.workspace, "fz")
    for delta in (9999999999999999999, 1e19, 1e20, "999999999999999000000.123456789"):
        response = segment.post("/v1/track", _delta_body(delta))
        assert response.status_code == 200, response.content
        assert response.json()["status"] == "mapped", response.json()
    amounts = sorted(Usage.objects.for_workspace(tenant.workspace).values_list("amount", flat=True))
    assert len(amounts) == 4
    if is_postgres():  # SQLite keeps numerics as floats
        assert amounts == [
            Decimal("9999999999999999999"),
            Decimal("1E19"),
            Decimal("1E20"),
            Decimal("999999999999999000000.123456789"),
        ]
    # Totals beyond the column's own range still add up and are served.
    usage = ApiClient(tenant).get("usage")
    assert usage.status_code == 200, usage.content
    assert usage.json()["results"][0]["total"] > 1e21


@pytest.mark.parametrize("delta", [1e21, 10**25, "1e21", "999999999999999999999.9999999999", 10**300])
def test_it_stores_an_amount_beyond_the_column_unmapped_as_invalid_amount(segment, tenant, delta):
    make_feature(tenant.workspace, "fz")
    response = segment.post("/v1/track", _delta_body(delta))
    assert response.status_code == 200, response.content
    assert response.json() == {**response.json(), "status": "unmapped", "reason": "invalid_amount"}
    event = Event.objects.for_workspace(tenant.workspace).get()
    assert (event.status, event.unmapped_reason) == (EventStatus.UNMAPPED, UnmappedReason.INVALID_AMOUNT)
    assert not Usage.objects.exists()


@pytest.mark.parametrize("delta", ["lots", "1e400", "1e999999999", 10**400])
def test_a_non_numeric_amount_is_still_invalid_delta(segment, tenant, delta):
    # Beyond a float's range is "not a finite number", as the JSON number 1e400 is.
    make_feature(tenant.workspace, "fz")
    response = segment.post("/v1/track", _delta_body(delta))
    assert response.status_code == 200, response.content
    assert response.json()["reason"] == "invalid_delta"


@pytest.mark.parametrize("size", [3, 12])  # 12: the COPY path on PostgreSQL
def test_a_batch_with_huge_amounts_keeps_every_message(segment, tenant, size):
    make_feature(tenant.workspace, "fz")
    deltas = [1, 1e19, 1e20, 1e21][: max(size, 4)]
    messages = [{"type": "track", "messageId": f"m{i}", **_delta_body(deltas[i % len(deltas)])} for i in range(size)]
    response = segment.batch(messages)
    assert response.status_code == 200, response.content
    assert response.json()["accepted"] == size
    events = Event.objects.for_workspace(tenant.workspace)
    assert events.count() == size
    refused = [i for i in range(size) if deltas[i % len(deltas)] == 1e21]
    invalid = events.filter(unmapped_reason=UnmappedReason.INVALID_AMOUNT).values_list("message_id", flat=True)
    assert sorted(int(m[1:]) for m in invalid) == refused
    assert Usage.objects.for_workspace(tenant.workspace).count() == size - len(refused)


# --- Item 3: integers beyond a float's range in numeric comparisons ------------------------

HUGE = 10**400


@pytest.mark.parametrize("operator", ["gt", "gte", "lt", "lte"])
def test_a_huge_integer_never_matches_a_numeric_comparison(operator):
    condition = {"property": "seats", "operator": operator, "value": 5}
    assert condition_matches({"seats": HUGE}, condition) is False
    assert condition_matches({"seats": [HUGE, 1]}, condition) is (operator in ("lt", "lte"))


def test_a_huge_integer_still_equals_itself():
    assert condition_matches({"seats": HUGE}, {"property": "seats", "operator": "equals", "value": HUGE})
    assert not condition_matches({"seats": HUGE}, {"property": "seats", "operator": "equals", "value": 5})


def test_a_rule_comparing_with_a_huge_integer_is_refused():
    with pytest.raises(InvalidRule):
        clean_conditions([{"property": "seats", "operator": "gt", "value": HUGE}])


def test_an_event_with_a_huge_integer_in_a_compared_property_is_stored(segment, tenant):
    make_feature(tenant.workspace, "seats")
    make_rule(tenant.workspace, "seats", event="Seats", conditions=[{"property": "n", "operator": "gt", "value": 5}])
    huge = segment.post("/v1/track", f'{{"userId": "u", "event": "Seats", "properties": {{"n": {HUGE}}}}}')
    assert huge.status_code == 200, huge.content
    assert (huge.json()["status"], huge.json()["reason"]) == ("unmapped", "no_matching_rule")
    ok = segment.track("u", "Seats", {"n": 6})
    assert ok.json()["status"] == "mapped"
    messages = [f'{{"type": "track", "userId": "u", "event": "Seats", "properties": {{"n": {n}}}}}' for n in (HUGE, 7)]
    batch = segment.post("/v1/batch", '{"batch": [' + ", ".join(messages) + "]}")
    assert batch.status_code == 200, batch.content
    assert batch.json()["accepted"] == 2
    assert Usage.objects.for_workspace(tenant.workspace).count() == 2


def test_a_path_with_a_non_decimal_digit_never_breaks_the_evaluator():
    # "²".isdigit() is true but int("²") raises: a path step is a list index only if decimal.
    assert condition_matches({"items": [1, 2]}, {"property": "items.²", "operator": "exists"}) is False
