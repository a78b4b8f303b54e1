"""REST API: merging users (idempotent, recorded) and the merge ledger."""

from features.models import Usage
from users.models import EndUser, MergeRecord

from .api_support import ApiClient, assert_error, assert_page, bare_user, feature, identify, track


def test_it_merges_into_the_oldest_and_moves_everything(tenant):
    feature(tenant, "exports")
    old = identify(tenant, "old", name="Ada")
    new = identify(tenant, "new", email="ada@example.com")
    track(tenant, "new", "Exported", featureId="exports", delta=3)
    response = ApiClient(tenant).post("users/merge", {"user_ids": [new.pk, old.pk]})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["absorbed_ids"] == [new.pk] and body["already_merged"] is False
    survivor = body["survivor"]
    assert survivor["id"] == old.pk and survivor["user_ids"] == ["old", "new"]
    assert (survivor["name"], survivor["email"]) == ("Ada", "ada@example.com")
    assert not EndUser.objects.filter(pk=new.pk).exists()
    assert Usage.objects.get(user=old).amount == 3


def test_the_same_merge_twice_merges_once_and_answers_the_same_survivor(tenant):
    a, b, c = identify(tenant, "a"), identify(tenant, "b"), identify(tenant, "c")
    api = ApiClient(tenant)
    request = {"user_ids": [a.pk, b.pk, c.pk], "survivor": b.pk}
    first = api.post("users/merge", request).json()
    again = api.post("users/merge", request)
    assert again.status_code == 200, again.content
    assert first["survivor"]["id"] == again.json()["survivor"]["id"] == b.pk
    assert sorted(first["absorbed_ids"]) == sorted([a.pk, c.pk])
    assert again.json()["absorbed_ids"] == [] and again.json()["already_merged"] is True
    assert MergeRecord.objects.for_workspace(tenant.workspace).count() == 2
    ledger = assert_page(api.get("merges").json())
    assert sorted(r["absorbed_id"] for r in ledger) == sorted([a.pk, c.pk])
    assert {r["survivor"] for r in ledger} == {b.pk}
    assert {r["reason"] for r in ledger} == {"admin"}
    assert all(r["actor"] == f"api-key:{tenant.key[:13]}" for r in ledger)
    assert {r["absorbed"]["user_id"] for r in ledger} == {"a", "c"}


def test_it_refuses_too_few_unknown_or_malformed_users(tenant):
    a = identify(tenant, "a")
    api = ApiClient(tenant)
    assert_error(api.post("users/merge", {"user_ids": [a.pk]}), 400, "too_few_users", "user_ids")
    assert_error(api.post("users/merge", {"user_ids": [a.pk, a.pk]}), 400, "too_few_users", "user_ids")
    assert_error(api.post("users/merge", {"user_ids": [a.pk, 999999]}), 404, "unknown_user", "user_ids")
    assert_error(api.post("users/merge", {"user_ids": ["x", a.pk]}), 400, "invalid_request", "user_ids")
    assert_error(api.post("users/merge", {"user_ids": [a.pk], "survivor": 0}), 400, "invalid_request", "survivor")
    assert_error(api.post("users/merge", {}), 400, "invalid_request", "user_ids")
    assert EndUser.objects.filter(pk=a.pk).exists()


def test_a_survivor_outside_the_list_joins_the_merge(tenant):
    a = identify(tenant, "a")
    b = bare_user(tenant, "b@example.com")
    body = ApiClient(tenant).post("users/merge", {"user_ids": [a.pk], "survivor": b.pk}).json()
    assert body["survivor"]["id"] == b.pk and body["absorbed_ids"] == [a.pk]
    assert body["survivor"]["user_id"] == "a", "the bare survivor takes the absorbed user's userId"


def test_the_ledger_lists_newest_first_filters_by_survivor_and_shows_one_record(tenant):
    a, b, c, d = (identify(tenant, uid) for uid in "abcd")
    api = ApiClient(tenant)
    api.post("users/merge", {"user_ids": [a.pk, b.pk]})
    api.post("users/merge", {"user_ids": [c.pk, d.pk]})
    ledger = assert_page(api.get("merges").json())
    assert [r["absorbed_id"] for r in ledger] == [d.pk, b.pk]
    only_c = api.get("merges", {"user": c.pk}).json()["results"]
    assert [r["absorbed_id"] for r in only_c] == [d.pk]
    record = api.get(f"merges/{ledger[0]['id']}").json()
    assert record == ledger[0]
    assert set(record) == {
        "id",
        "survivor",
        "absorbed_id",
        "absorbed",
        "reason",
        "actor",
        "source",
        "created_at",
        "conflicts",
        "billing_conflict",
        "undone_at",
        "undone_by",
    }
    assert_error(api.get("merges/999999"), 404, "not_found")
    assert_error(api.get("merges", {"user": "x"}), 400, "invalid_request", "user")
