"""/api/v1/packages and /api/v1/subscriptions: editing rules, the base/add-on rules, plan changes, audit."""

from kana.models import AuditEntry
from kana.signals import notification

from .api_support import ApiClient, assert_error, feature, identify
from .entitlement_support import package, subscribe


def test_a_draft_changes_freely_a_published_package_only_name_metadata_and_status(tenant):
    feature(tenant, "messages")
    api = ApiClient(tenant)
    created = package(tenant, "pro", {"feature": "messages", "limit": 10}, status="draft")
    assert created["features"] == [
        {"feature": "messages", "limit": 10, "overage_enabled": False, "reset_period": "month"}
    ]

    changed = api.patch("packages/pro", {"features": [{"feature": "messages", "limit": 20, "reset_period": "week"}]})
    assert changed.json()["features"][0]["limit"] == 20
    assert api.patch("packages/pro", {"status": "published"}).json()["status"] == "published"

    assert_error(api.patch("packages/pro", {"features": []}), 409, "package_published", "features")
    assert_error(api.patch("packages/pro", {"is_addon": True}), 409, "package_published", "is_addon")
    assert api.patch("packages/pro", {"name": "Pro", "metadata": {"a": 1}}).status_code == 200
    assert api.patch("packages/pro", {"status": "archived"}).json()["status"] == "archived"
    assert_error(api.patch("packages/pro", {"status": "published"}), 409, "invalid_status_change")
    assert_error(api.post("packages", {"id": "pro"}), 409, "package_exists")
    assert api.get("packages/pro").json()["metadata"] == {"a": 1}

    actions = list(AuditEntry.objects.filter(object_type="package").values_list("action", flat=True))
    assert sorted(actions) == ["package.create"] + ["package.update"] * 4


def test_archived_and_draft_packages_take_no_subscriptions(tenant):
    identify(tenant, "u1")
    package(tenant, "old")
    package(tenant, "new", status="draft")
    ApiClient(tenant).patch("packages/old", {"status": "archived"})
    for key in ("old", "new"):
        response = ApiClient(tenant).post("subscriptions", {"user_id": "u1", "package": key})
        assert_error(response, 409, "package_not_published")


def test_a_plan_change_to_an_unpublished_package_is_refused_and_changes_nothing(tenant):
    identify(tenant, "u1")
    package(tenant, "basic")
    package(tenant, "old")
    package(tenant, "new", status="draft")
    ApiClient(tenant).patch("packages/old", {"status": "archived"})
    basic = subscribe(tenant, "basic", user_id="u1")
    api = ApiClient(tenant)
    for key in ("old", "new"):
        assert_error(api.patch(f"subscriptions/{basic['id']}", {"package": key}), 409, "package_not_published")
    assert api.get(f"subscriptions/{basic['id']}").json()["package"] == "basic"


def test_one_live_base_package_per_subject_and_add_ons_need_one(tenant):
    identify(tenant, "u1")
    package(tenant, "basic")
    package(tenant, "pro")
    package(tenant, "boost", is_addon=True)
    api = ApiClient(tenant)

    assert_error(api.post("subscriptions", {"user_id": "u1", "package": "boost"}), 409, "addon_without_base")
    basic = subscribe(tenant, "basic", user_id="u1")
    assert_error(api.post("subscriptions", {"user_id": "u1", "package": "pro"}), 409, "multiple_base_packages")
    subscribe(tenant, "boost", user_id="u1")
    subscribe(tenant, "boost", user_id="u1")  # any number of add-ons

    api.patch(f"subscriptions/{basic['id']}", {"status": "cancelled"})
    assert subscribe(tenant, "pro", user_id="u1")["status"] == "active"
    listed = api.get("subscriptions", {"user_id": "u1", "status": "active"}).json()["results"]
    assert sorted(s["package"] for s in listed) == ["boost", "boost", "pro"]
    assert api.get("subscriptions", {"user_id": "nobody"}).json()["count"] == 0


def test_changing_plan_keeps_the_anchor_and_notifies(tenant):
    identify(tenant, "u1")
    package(tenant, "basic")
    package(tenant, "pro")
    package(tenant, "boost", is_addon=True)
    sent = []

    def receiver(sender, **kwargs):
        sent.append(kwargs)

    notification.connect(receiver, weak=False)
    try:
        sub = subscribe(tenant, "basic", user_id="u1", started_at="2025-01-31T10:00:00Z")
        changed = ApiClient(tenant).patch(f"subscriptions/{sub['id']}", {"package": "pro"}).json()
        assert_error(
            ApiClient(tenant).patch(f"subscriptions/{sub['id']}", {"package": "boost"}), 409, "package_kind_mismatch"
        )
    finally:
        notification.disconnect(receiver)

    assert (changed["package"], changed["started_at"]) == ("pro", "2025-01-31T10:00:00Z")
    assert changed["user_id"] == "u1" and changed["group_id"] is None
    assert [(n["event_type"], n["data"]["package"]) for n in sent] == [
        ("subscription.updated", "basic"),
        ("subscription.updated", "pro"),
    ]
    assert len({n["event_key"] for n in sent}) == 2
    entries = AuditEntry.objects.filter(object_type="subscription").order_by("pk")
    assert [e.action for e in entries] == ["subscription.create", "subscription.update"]
    assert (entries[1].before["package"], entries[1].after["package"]) == ("basic", "pro")


def test_a_feature_in_a_package_cannot_be_deleted(tenant):
    feature(tenant, "messages")
    package(tenant, "pro", {"feature": "messages", "limit": 10}, status="draft")
    assert_error(ApiClient(tenant).delete("features/messages"), 409, "feature_in_use")
    assert ApiClient(tenant).delete("packages/pro").status_code == 204
    assert ApiClient(tenant).delete("features/messages").status_code == 204


def test_a_feature_row_without_its_feature_is_refused_on_patch_not_a_500(tenant):
    # schemathesis found it: PATCH validated the rows partially, so a row missing "feature"
    # reached the service and raised KeyError (500).
    feature(tenant, "messages")
    package(tenant, "draft-plan", {"feature": "messages", "limit": 5}, status="draft")
    response = ApiClient(tenant).patch("packages/draft-plan", {"features": [{"limit": 0, "reset_period": "month"}]})
    assert_error(response, 400, "invalid_request")
    assert ApiClient(tenant).get("packages/draft-plan").json()["features"][0]["limit"] == 5
