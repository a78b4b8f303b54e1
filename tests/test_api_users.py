"""REST API: users list/detail/update/delete, duplicates and a user's usage."""

from django.db import connection
from django.test.utils import CaptureQueriesContext

from features.models import Event
from users.models import EndUser, UserIdentity
from users.services import alias_user

from .api_support import (
    USER_FIELDS,
    ApiClient,
    assert_error,
    assert_fields,
    assert_page,
    at,
    bare_user,
    identify,
    track,
)
from .conftest import SegmentClient


def test_it_lists_users_in_the_spec_shape(tenant):
    identify(tenant, "u1", name="Ada", email="ada@example.com", billingUserId="cus_ABC123")
    body = ApiClient(tenant).get("users").json()
    [user] = assert_page(body)
    assert set(user) == USER_FIELDS
    assert user["user_id"] == "u1" and user["user_ids"] == ["u1"]
    assert (user["name"], user["email"], user["billing_id"], user["billing_provider"]) == (
        "Ada",
        "ada@example.com",
        "cus_ABC123",
        "stripe",
    )
    assert user["flags"] == [] and user["audiences"] == {}


def test_it_filters_by_any_user_id_of_a_user(tenant):
    user = identify(tenant, "new-id")
    alias_user(workspace=tenant.workspace, previous_id="anon-1", user_id="new-id", occurred_at=user.created_at)
    identify(tenant, "someone-else")
    api = ApiClient(tenant)
    [found] = api.get("users", {"user_id": "anon-1"}).json()["results"]
    assert found["id"] == user.pk
    assert found["user_ids"] == ["new-id", "anon-1"], "canonical userId first"
    assert api.get("users", {"user_id": "nobody"}).json()["count"] == 0


def test_it_filters_by_email_case_insensitively_and_by_flag_and_search(tenant):
    a = identify(tenant, "a", email="Shared@Example.com", billingUserId="cus_A1")
    b = identify(tenant, "b", email="shared@example.com")
    c = identify(tenant, "c", name="Grace Hopper", email="grace@example.com", billingUserId="cus_C1")
    api = ApiClient(tenant)

    def ids(params):
        return {u["id"] for u in api.get("users", params).json()["results"]}

    assert ids({"email": " SHARED@example.COM "}) == {a.pk, b.pk}
    assert ids({"flag": "same_email"}) == {a.pk, b.pk}
    assert ids({"flag": "no_billing_id"}) == {b.pk}
    assert ids({"search": "hopper"}) == {c.pk}
    flagged = api.get("users", {"user_id": "b"}).json()["results"][0]
    assert flagged["flags"] == ["no_billing_id", "same_email"]


def test_it_rejects_an_unknown_flag(tenant):
    assert_error(ApiClient(tenant).get("users", {"flag": "vip"}), 400, "invalid_request", "flag")


def test_the_list_does_a_fixed_number_of_queries(tenant):
    for n in range(12):
        identify(tenant, f"u{n}", email=f"u{n}@example.com")
    api = ApiClient(tenant)
    api.get("users")  # warm the key cache
    with CaptureQueriesContext(connection) as few:
        api.get("users", {"page_size": 2})
    with CaptureQueriesContext(connection) as many:
        body = api.get("users", {"page_size": 12}).json()
    assert len(body["results"]) == 12 and all(u["user_ids"] for u in body["results"])
    assert len(many) == len(few) <= 3


def test_it_paginates_with_count_next_and_previous(tenant):
    for n in range(5):
        identify(tenant, f"u{n}")
    api = ApiClient(tenant)
    first = api.get("users", {"page_size": 2}).json()
    assert first["count"] == 5 and len(assert_page(first)) == 2
    assert first["previous"] is None and "page=2" in first["next"]
    last = api.get("users", {"page_size": 2, "page": 3}).json()
    assert len(last["results"]) == 1 and last["next"] is None and "page_size=2" in last["previous"]
    seen = [u["id"] for p in (1, 2, 3) for u in api.get("users", {"page_size": 2, "page": p}).json()["results"]]
    assert len(set(seen)) == 5, "pages neither overlap nor skip"
    assert_error(api.get("users", {"page": 9}), 404, "not_found")


def test_it_returns_one_user(tenant):
    user = identify(tenant, "u1", email="ada@example.com")
    body = ApiClient(tenant).get(f"users/{user.pk}").json()
    assert body["id"] == user.pk and body["email"] == "ada@example.com"


def test_an_unknown_user_is_404(tenant):
    api = ApiClient(tenant)
    assert_error(api.get("users/999999"), 404, "not_found")
    assert_error(api.get(f"users/{2**63}"), 404, "not_found")
    assert_error(api.get("users/not-a-number"), 404, "not_found")


def test_it_updates_name_email_and_billing_id(tenant):
    user = identify(tenant, "u1", name="Ada", email="ada@example.com")
    response = ApiClient(tenant).patch(f"users/{user.pk}", {"email": "ADA@new.example", "billing_id": "cb-42"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert_fields(body, name="Ada", email="ADA@new.example", billing_id="cb-42", billing_provider="chargebee")
    user.refresh_from_db()
    assert user.email_key == "ada@new.example" and user.billing_id == "cb-42"


def test_null_clears_a_field(tenant):
    user = identify(tenant, "u1", name="Ada", billingUserId="cus_X1")
    body = ApiClient(tenant).patch(f"users/{user.pk}", {"name": None, "billing_id": ""}).json()
    assert body["name"] == "" and body["billing_id"] == "" and "no_billing_id" in body["flags"]


def test_an_invalid_value_is_a_400_naming_the_field_and_changes_nothing(tenant):
    user = identify(tenant, "u1", name="Ada", email="ada@example.com")
    api = ApiClient(tenant)
    assert_error(api.patch(f"users/{user.pk}", {"name": "Bob", "email": "not-an-email"}), 400, "invalid_email", "email")
    assert_error(api.patch(f"users/{user.pk}", {"billing_id": "has spaces!"}), 400, "invalid_billing_id", "billing_id")
    too_long = "cus_" + "a" * 60
    assert_error(api.patch(f"users/{user.pk}", {"billing_id": too_long}), 400, "invalid_billing_id", "billing_id")
    assert_error(api.patch(f"users/{user.pk}", {"user_id": "other"}), 400, "invalid_request", "user_id")
    assert_error(api.patch(f"users/{user.pk}", {"name": "x" * 300}), 400, "invalid_request", "name")
    user.refresh_from_db()
    assert (user.name, user.email) == ("Ada", "ada@example.com")


def test_an_over_long_stripe_id_from_segment_is_a_warning_not_a_crash(tenant):
    response = SegmentClient(tenant).identify("u1", {"name": "Ada", "billingUserId": "cus_" + "a" * 60})
    assert response.status_code == 200, response.content
    assert response.json()["warnings"][0]["code"] == "invalid_billing_id"
    body = ApiClient(tenant).get("users", {"user_id": "u1"}).json()["results"][0]
    assert (body["name"], body["billing_id"]) == ("Ada", "")


def test_it_deletes_a_user_and_keeps_its_events(tenant):
    user = identify(tenant, "u1")
    track(tenant, "u1", "Clicked")
    api = ApiClient(tenant)
    response = api.delete(f"users/{user.pk}")
    assert response.status_code == 204, response.content
    assert not EndUser.objects.filter(pk=user.pk).exists()
    assert not UserIdentity.objects.filter(user_id=user.pk).exists()
    assert Event.objects.for_workspace(tenant.workspace).filter(name="Clicked", user=None).count() == 1
    assert_error(api.delete(f"users/{user.pk}"), 404, "not_found")


def test_it_lists_duplicate_groups(tenant):
    bare = bare_user(tenant, "DUP@example.com")
    a = identify(tenant, "a", email="other@example.com")
    b = identify(tenant, "b", email="other@example.com")
    identify(tenant, "c", email="dup@example.com")  # claims the bare user: no duplicate
    body = ApiClient(tenant).get("users/duplicates").json()
    [group] = assert_page(body)
    assert group["email"] == "other@example.com"
    assert [u["id"] for u in group["users"]] == [a.pk, b.pk], "oldest first"
    assert group["users"][0]["user_ids"] == ["a"] and group["users"][1]["user_ids"] == ["b"]
    assert EndUser.objects.get(pk=bare.pk).user_id == "c"
    assert all("same_email" in u["flags"] for u in group["users"])


def test_it_reports_a_users_usage_per_feature_in_a_range(tenant, exports_and_seats):
    user = identify(tenant, "u1")
    track(tenant, "u1", "Exported", featureId="exports", delta=2, _at=at(3))
    track(tenant, "u1", "Exported", featureId="exports", delta=5, _at=at(20))
    track(tenant, "other", "Exported", featureId="exports", delta=100, _at=at(3))
    api = ApiClient(tenant)
    rows = assert_page(api.get(f"users/{user.pk}/usage").json())
    assert [(r["feature"], r["total"]) for r in rows] == [("exports", 7), ("seats", 0)]
    assert rows[0]["user"] == user.pk and rows[0]["user_id"] == "u1" and rows[0]["type"] == "CONSUMABLE"
    ranged = api.get(f"users/{user.pk}/usage", {"start": at(1), "end": at(10)}).json()["results"]
    assert [(r["feature"], r["total"]) for r in ranged] == [("exports", 2), ("seats", 0)]
    assert_error(api.get(f"users/{user.pk}/usage", {"start": "yesterday"}), 400, "invalid_request", "start")
    # An end before the start is an empty range (a schema cannot compare two parameters).
    inverted = api.get(f"users/{user.pk}/usage", {"start": at(9), "end": at(2)}).json()["results"]
    assert [r["total"] for r in inverted] == [0.0, 0.0]
    assert_error(api.get("users/999999/usage"), 404, "not_found")


def test_it_needs_a_valid_key(tenant):
    assert_error(ApiClient(None, auth="").get("users"), 401, "not_authenticated")
    assert_error(ApiClient(None, auth="Bearer prv_live_" + "x" * 32).get("users"), 401, "invalid_api_key")
    basic = ApiClient(None, auth=tenant.basic()).get("users")
    assert basic.status_code == 200, "Segment's Basic form works too"
