"""A merge moves each user's subscriptions as they are, so two users on two plans become one
user holding two live base packages. Kana does not choose between them; it shows the case:
in the API merge's conflicts, in the dashboard's merge preview, after the merge and on the
user's plan page. The check meanwhile answers with the highest limit."""

from entitlements.models import Subscription, SubscriptionStatus
from users.models import EndUser

from .api_support import ApiClient, feature, identify
from .entitlement_support import check, package, subscribe


def _two_users_on_two_plans(tenant):
    feature(tenant, "messages")
    package(tenant, "basic", {"feature": "messages", "limit": 10})
    package(tenant, "pro", {"feature": "messages", "limit": 100})
    package(tenant, "boost", {"feature": "messages", "limit": 5}, is_addon=True)
    older, newer = identify(tenant, "older"), identify(tenant, "newer")
    subscribe(tenant, "basic", user_id="older")
    subscribe(tenant, "pro", user_id="newer")
    return older, newer


def test_the_api_merge_lists_two_live_base_packages_as_a_conflict(tenant):
    older, newer = _two_users_on_two_plans(tenant)
    subscribe(tenant, "boost", user_id="newer")  # an add-on is no second plan

    response = ApiClient(tenant).post("users/merge", {"user_ids": [older.pk, newer.pk]})

    assert response.status_code == 200, response.content
    conflicts = [c for c in response.json()["conflicts"] if c["field"] == "base_package"]
    assert conflicts == [{"field": "base_package", "survivor": "basic", "absorbed": "pro", "kept": "basic, pro"}]
    held = Subscription.objects.filter(user_id=older.pk, package__is_addon=False)
    assert sorted(s.package.key for s in held) == ["basic", "pro"]  # nothing cancelled behind the admin's back
    assert check(tenant, "messages", user_id="newer")["consumption"]["budget"] == 100  # the highest limit


def test_no_base_package_conflict_when_one_user_has_a_plan_or_the_other_one_is_cancelled(tenant):
    older, newer = _two_users_on_two_plans(tenant)
    cancelled = Subscription.objects.get(user_id=older.pk)
    response = ApiClient(tenant).patch(f"subscriptions/{cancelled.pk}", {"status": "cancelled"})
    assert response.status_code == 200, response.content
    third = identify(tenant, "third")

    merged = ApiClient(tenant).post("users/merge", {"user_ids": [older.pk, newer.pk]})
    also = ApiClient(tenant).post("users/merge", {"user_ids": [older.pk, third.pk]})

    for response in (merged, also):
        assert response.status_code == 200, response.content
        assert [c for c in response.json()["conflicts"] if c["field"] == "base_package"] == []


def test_the_dashboard_warns_before_and_after_the_merge_and_on_the_plan_page(tenant, member_client):
    older, newer = _two_users_on_two_plans(tenant)

    preview = member_client.get("/duplicates/preview/", {"users": [older.pk, newer.pk]}).content.decode()
    notice = preview.split('id="merge-base-packages"')[1].split("</div>")[0]
    assert "2 live base packages" in notice and ">basic<" in notice and ">pro<" in notice

    merged = member_client.post("/duplicates/merge/", {"users": [older.pk, newer.pk]}, follow=True)
    assert "now holds 2 live base packages (basic, pro)" in merged.content.decode()

    plan = member_client.get(f"/users/{older.pk}/entitlements/").content.decode()
    assert "2 live base packages." in plan.split('id="multiple-base-packages"')[1].split("</div>")[0]

    Subscription.objects.filter(package__key="basic").update(status=SubscriptionStatus.CANCELLED)
    assert 'id="multiple-base-packages"' not in member_client.get(f"/users/{older.pk}/entitlements/").content.decode()
    assert EndUser.objects.filter(pk=newer.pk).count() == 0


def test_one_plan_shows_no_warning(tenant, member_client):
    older, newer = _two_users_on_two_plans(tenant)
    Subscription.objects.filter(package__key="pro").delete()
    preview = member_client.get("/duplicates/preview/", {"users": [older.pk, newer.pk]}).content.decode()
    assert 'id="merge-base-packages"' not in preview
    assert 'id="multiple-base-packages"' not in member_client.get(f"/users/{older.pk}/entitlements/").content.decode()
