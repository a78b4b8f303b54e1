"""GET /api/v1/entitlements/check: every reason code of SPEC §11, limits across packages and groups."""

from datetime import UTC, datetime, timedelta

import pytest

from features.models import FeatureType

from .api_support import ApiClient, feature, identify, track
from .entitlement_support import check, join_group, package, subscribe, user_with_package

# Every test runs on both routes: Django's views and the lean front (api.lean).
pytestmark = pytest.mark.usefixtures("api_route")


def test_it_answers_unknown_feature_and_unknown_user_without_a_404(tenant):
    feature(tenant, "messages")
    assert check(tenant, "nope", user_id="u1") | {"message": ""} == {
        "access": False,
        "reason": "unknown_feature",
        "message": "",
        "consumption": None,
        "period": None,
    }
    assert check(tenant, "messages", user_id="ghost")["reason"] == "unknown_user"
    assert check(tenant, "messages", group_id="ghosts")["reason"] == "unknown_group"


def test_no_subscription_inactive_and_feature_not_in_package(tenant):
    feature(tenant, "messages")
    feature(tenant, "exports")
    identify(tenant, "u1")
    assert check(tenant, "messages", user_id="u1")["reason"] == "no_subscription"

    package(tenant, "basic", {"feature": "messages", "limit": 5})
    sub = subscribe(tenant, "basic", user_id="u1", status="past_due")
    answer = check(tenant, "messages", user_id="u1")
    assert (answer["access"], answer["reason"]) == (False, "subscription_inactive")

    ApiClient(tenant).patch(f"subscriptions/{sub['id']}", {"status": "trialing"})
    assert check(tenant, "messages", user_id="u1")["reason"] == "within_limit"
    assert check(tenant, "exports", user_id="u1")["reason"] == "feature_not_in_package"


def test_within_limit_then_limit_reached_and_overage(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 3)
    now = datetime.now(UTC).isoformat()
    track(tenant, "u1", "Sent", featureId="messages", delta=2, _at=now)

    answer = check(tenant, "messages", user_id="u1")
    assert (answer["access"], answer["reason"]) == (True, "within_limit")
    assert answer["consumption"] == {"used": 2, "budget": 3, "remaining": 1, "held": 0, "overage_enabled": False}
    assert check(tenant, "messages", user_id="u1", delta=2)["reason"] == "limit_reached"

    user_with_package(tenant, "u2", 1, overage_enabled=True)
    track(tenant, "u2", "Sent", featureId="messages", delta=5, _at=datetime.now(UTC).isoformat())
    answer = check(tenant, "messages", user_id="u2")
    assert (answer["access"], answer["reason"], answer["consumption"]["remaining"]) == (True, "overage_enabled", 0)


def test_binary_features_give_access_without_a_budget(tenant):
    feature(tenant, "sso", type=FeatureType.BINARY)
    identify(tenant, "u1")
    package(tenant, "ent", {"feature": "sso"})
    subscribe(tenant, "ent", user_id="u1")
    answer = check(tenant, "sso", user_id="u1")
    assert (answer["access"], answer["reason"], answer["consumption"]) == (True, "binary_access", None)
    response = ApiClient(tenant).post("packages", {"id": "bad", "features": [{"feature": "sso", "limit": 3}]})
    assert response.status_code == 409 and response.json()["code"] == "binary_feature_limit"


def test_the_highest_limit_wins_across_packages_and_groups_and_null_beats_any_number(tenant):
    feature(tenant, "messages")
    identify(tenant, "u1")
    join_group(tenant, "u1", "acme")
    package(tenant, "base", {"feature": "messages", "limit": 10})
    package(tenant, "boost", {"feature": "messages", "limit": 50}, is_addon=True)
    package(tenant, "team", {"feature": "messages", "limit": 30})
    package(tenant, "unlimited", {"feature": "messages", "limit": None}, is_addon=True)
    subscribe(tenant, "base", user_id="u1")
    assert check(tenant, "messages", user_id="u1")["consumption"]["budget"] == 10
    subscribe(tenant, "team", group_id="acme")
    assert check(tenant, "messages", user_id="u1")["consumption"]["budget"] == 30
    subscribe(tenant, "boost", user_id="u1")
    assert check(tenant, "messages", user_id="u1")["consumption"]["budget"] == 50
    subscribe(tenant, "unlimited", group_id="acme")
    answer = check(tenant, "messages", user_id="u1")
    assert (answer["consumption"]["budget"], answer["consumption"]["remaining"], answer["reason"]) == (
        None,
        None,
        "within_limit",
    )


def test_a_groups_budget_is_used_by_all_its_members(tenant):
    feature(tenant, "messages")
    for user_id in ("u1", "u2"):
        identify(tenant, user_id)
        join_group(tenant, user_id, "acme")
    package(tenant, "team", {"feature": "messages", "limit": 5})
    subscribe(tenant, "team", group_id="acme")
    now = datetime.now(UTC).isoformat()
    track(tenant, "u1", "Sent", featureId="messages", delta=2, _at=now)
    track(tenant, "u2", "Sent", featureId="messages", delta=3, _at=now)

    assert check(tenant, "messages", group_id="acme")["consumption"]["used"] == 5
    answer = check(tenant, "messages", user_id="u1")
    assert (answer["access"], answer["reason"], answer["consumption"]["used"]) == (False, "limit_reached", 5)


def test_usage_counts_in_the_period_of_its_own_time(tenant):
    feature(tenant, "messages")
    identify(tenant, "u1")
    package(tenant, "daily", {"feature": "messages", "limit": 3, "reset_period": "day"})
    started = datetime.now(UTC) - timedelta(days=3, hours=1)
    subscribe(tenant, "daily", user_id="u1", started_at=started.isoformat())
    # A late event from two days ago lands in its own period, not the current one.
    track(tenant, "u1", "Sent", featureId="messages", delta=3, _at=(started + timedelta(days=1, hours=2)).isoformat())
    track(tenant, "u1", "Sent", featureId="messages", delta=1, _at=datetime.now(UTC).isoformat())

    answer = check(tenant, "messages", user_id="u1")
    assert answer["consumption"]["used"] == 1
    assert answer["period"]["start"].startswith((started + timedelta(days=3)).date().isoformat())
    history = ApiClient(tenant).get("entitlements/usage", {"user_id": "u1", "feature": "messages", "past": 6}).json()
    assert history["current"]["consumption"]["used"] == 1
    assert [p["consumption"]["used"] for p in history["past"]] == [0, 3, 0]


def test_a_check_naming_no_subject_is_about_an_unknown_user_and_user_id_wins_over_group_id(tenant):
    # A query cannot state "exactly one of" in OpenAPI: naming nobody is asking about an
    # unknown subject (an answer, like any unknown id), and user_id decides when both come.
    feature(tenant, "messages")
    response = ApiClient(tenant).get("entitlements/check", {"feature": "messages"})
    assert response.status_code == 200
    assert (response.json()["access"], response.json()["reason"]) == (False, "unknown_user")
    response = ApiClient(tenant).get("entitlements/check", {"feature": "messages", "user_id": "a", "group_id": "b"})
    assert response.status_code == 200
    assert (response.json()["access"], response.json()["reason"]) == (False, "unknown_user")


def test_a_checks_delta_is_a_number_rounded_like_a_json_amount(tenant):
    # The schema states delta as a number: "" is refused, more than 9 decimals are rounded
    # (as a recorded amount is), not refused.
    feature(tenant, "messages")
    client = ApiClient(tenant)
    assert client.get("entitlements/check", {"feature": "messages", "user_id": "a", "delta": ""}).status_code == 400
    response = client.get("entitlements/check", {"feature": "messages", "user_id": "a", "delta": "0.1234567891"})
    assert response.status_code == 200, response.content
    for huge in ("-2.8e273", "1e400"):  # refused before any rounding (a 500 once)
        response = client.get("entitlements/check", {"feature": "messages", "user_id": "a", "delta": huge})
        assert response.status_code == 400, response.content
