"""Entitlements stay in their workspace; a merged user's subscriptions follow it; a check's cost is fixed."""

from datetime import UTC, datetime

from entitlements.models import Subscription

from .api_support import ApiClient, feature, identify, track
from .entitlement_support import check, package, subscribe, user_with_package


def test_another_workspaces_key_sees_none_of_it(tenant, other_tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    hold = (
        ApiClient(tenant)
        .post(
            "entitlements/reservations",
            {"user_id": "u1", "feature": "messages", "amount": 1, "ttl_seconds": 60, "idempotency_key": "h"},
        )
        .json()
    )
    theirs = ApiClient(other_tenant)
    sub_id = Subscription.objects.get().pk

    assert theirs.get("packages").json()["count"] == 0
    assert theirs.get("packages/plan-u1").status_code == 404
    assert theirs.get("subscriptions").json()["count"] == 0
    assert theirs.get(f"subscriptions/{sub_id}").status_code == 404
    assert theirs.get(f"entitlements/reservations/{hold['id']}").status_code == 404
    assert theirs.post(f"entitlements/reservations/{hold['id']}/release").status_code == 404
    assert check(other_tenant, "messages", user_id="u1")["reason"] == "unknown_feature"
    assert ApiClient(tenant).get("subscriptions", {"user_id": "nobody"}).json()["count"] == 0


def test_a_merged_users_subscription_and_usage_follow_it(tenant):
    feature(tenant, "messages")
    identify(tenant, "old")
    user_with_package(tenant, "new", 10)
    track(tenant, "new", "Sent", featureId="messages", delta=4, _at=datetime.now(UTC).isoformat())
    old_pk = Subscription.objects.get().user_id
    survivor = identify(tenant, "old")

    response = ApiClient(tenant).post("users/merge", {"user_ids": [survivor.pk, old_pk]})

    assert response.status_code == 200, response.content
    assert Subscription.objects.get().user_id == survivor.pk
    answer = check(tenant, "messages", user_id="new")  # the absorbed userId resolves to the survivor
    assert (answer["reason"], answer["consumption"]["used"]) == ("within_limit", 4)


def test_a_check_costs_a_fixed_number_of_queries_whatever_the_history(tenant, django_assert_max_num_queries):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 1000)
    package(tenant, "boost", {"feature": "messages", "limit": 2000}, is_addon=True)
    subscribe(tenant, "boost", user_id="u1")
    for n in range(30):
        track(tenant, "u1", "Sent", featureId="messages", _at=datetime.now(UTC).isoformat(), messageId=f"m{n}")
    from entitlements.access import check as decide

    with django_assert_max_num_queries(8):
        answer = decide(tenant.workspace, feature_key="messages", user_id="u1")
    assert (answer.reason, answer.consumption.used, answer.consumption.budget) == ("within_limit", 30, 2000)


def _merge(api: ApiClient, survivor, absorbed) -> int:
    from users.models import MergeRecord

    response = api.post("users/merge", {"user_ids": [survivor.pk, absorbed.pk], "survivor": survivor.pk})
    assert response.status_code == 200, response.content
    return MergeRecord.objects.get(absorbed_id=absorbed.pk, undone_at__isnull=True).pk


def _subscribers() -> dict[str, int]:
    return {s.package.key: s.user_id for s in Subscription.objects.select_related("package")}


def test_undoing_a_merge_gives_the_restored_user_its_subscriptions_back(tenant):
    """Chained merges (b into a, then a into c) undone newest first: each subscription goes
    back to the user that had it, with its usage; the survivor keeps its own."""
    feature(tenant, "messages")
    a, b, c = identify(tenant, "a"), identify(tenant, "b"), identify(tenant, "c")
    package(tenant, "pa", {"feature": "messages", "limit": 10})
    package(tenant, "pb", {"feature": "messages", "limit": 20})
    package(tenant, "pc", {"feature": "messages", "limit": 30})
    for user_id in "abc":
        subscribe(tenant, f"p{user_id}", user_id=user_id)
    track(tenant, "b", "Sent", featureId="messages", delta=3, _at=datetime.now(UTC).isoformat())
    api = ApiClient(tenant)
    first = _merge(api, a, b)
    second = _merge(api, c, a)
    assert _subscribers() == {"pa": c.pk, "pb": c.pk, "pc": c.pk}

    assert api.post(f"merges/{second}/undo").status_code == 200
    assert _subscribers() == {"pa": a.pk, "pb": a.pk, "pc": c.pk}
    assert api.post(f"merges/{first}/undo").status_code == 200
    assert _subscribers() == {"pa": a.pk, "pb": b.pk, "pc": c.pk}
    answer = check(tenant, "messages", user_id="b")
    assert (answer["reason"], answer["consumption"]["used"], answer["consumption"]["budget"]) == ("within_limit", 3, 20)
    assert check(tenant, "messages", user_id="a")["consumption"]["budget"] == 10
    # Merged again after the undo: the subscription follows again, and a second undo returns it.
    again = _merge(api, a, b)
    assert _subscribers()["pb"] == a.pk
    assert api.post(f"merges/{again}/undo").status_code == 200
    assert _subscribers()["pb"] == b.pk
