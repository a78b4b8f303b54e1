"""Conflicts are shown, never silent (SPEC §12): the merge response lists them, an admin
chooses per field, and an automatic merge of two billing ids flags the survivor."""

from users.models import EndUser, MergeRecord

from .api_support import ApiClient, assert_error, identify
from .identity_support import at, bare_user, flags, iso


def _two_users(tenant):
    old = identify(tenant, "old", name="Ada", billingUserId="cus_OLD1")
    new = identify(tenant, "new", name="Ada L.", email="ada@example.com", billingUserId="cus_NEW2")
    return old, new


def test_it_lists_the_conflicts_and_keeps_the_newest_by_default(tenant):
    old, new = _two_users(tenant)
    response = ApiClient(tenant).post("users/merge", {"user_ids": [old.pk, new.pk]})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["survivor"]["id"] == old.pk
    # email: a blank filled from the other user is no conflict (nothing is lost).
    assert sorted(body["conflicts"], key=lambda c: c["field"]) == [
        {"field": "billing_id", "survivor": "cus_OLD1", "absorbed": "cus_NEW2", "kept": "cus_NEW2"},
        {"field": "name", "survivor": "Ada", "absorbed": "Ada L.", "kept": "Ada L."},
    ]
    assert body["survivor"]["billing_id"] == "cus_NEW2" and body["survivor"]["email"] == "ada@example.com"
    # The ledger keeps both values; an admin merge is reviewed, so no flag.
    record = MergeRecord.objects.get(absorbed_id=new.pk)
    assert record.absorbed_snapshot["billing_id"] == "cus_NEW2"
    assert {
        "field": "billing_id",
        "survivor": "cus_OLD1",
        "absorbed": "cus_NEW2",
        "kept": "cus_NEW2",
    } in record.conflicts
    assert record.billing_conflict is False
    assert "billing_conflict" not in body["survivor"]["flags"]


def test_it_honours_a_choice_per_field(tenant):
    old, new = _two_users(tenant)
    request = {"user_ids": [old.pk, new.pk], "fields": {"billing_id": "survivor", "name": "newest"}}
    body = ApiClient(tenant).post("users/merge", request).json()
    survivor = EndUser.objects.get(pk=old.pk)
    assert (survivor.billing_id, survivor.name, survivor.email) == ("cus_OLD1", "Ada L.", "ada@example.com")
    assert {c["field"]: c["kept"] for c in body["conflicts"]} == {"billing_id": "cus_OLD1", "name": "Ada L."}


def test_absorbed_choice_takes_the_absorbed_users_value_and_its_stamp(tenant):
    old = identify(tenant, "old", name="Newer name")
    new = identify(tenant, "new", name="Older name")
    EndUser.objects.filter(pk=new.pk).update(name_set_at=at(0))
    body = ApiClient(tenant).post("users/merge", {"user_ids": [old.pk, new.pk], "fields": {"name": "absorbed"}}).json()
    survivor = EndUser.objects.get(pk=old.pk)
    assert survivor.name == "Older name" and survivor.name_set_at == at(0)
    assert body["conflicts"] == [
        {"field": "name", "survivor": "Newer name", "absorbed": "Older name", "kept": "Older name"}
    ]


def test_a_choice_of_a_side_without_a_value_still_fills_the_blank(tenant):
    old = identify(tenant, "old")
    new = identify(tenant, "new", billingUserId="cus_NEW2")
    ApiClient(tenant).post("users/merge", {"user_ids": [old.pk, new.pk], "fields": {"billing_id": "survivor"}})
    assert EndUser.objects.get(pk=old.pk).billing_id == "cus_NEW2"


def test_it_refuses_unknown_fields_and_choices(tenant):
    old, new = _two_users(tenant)
    api = ApiClient(tenant)
    assert_error(
        api.post("users/merge", {"user_ids": [old.pk, new.pk], "fields": {"user_id": "survivor"}}),
        400,
        "invalid_request",
        "fields",
    )
    assert_error(
        api.post("users/merge", {"user_ids": [old.pk, new.pk], "fields": {"name": "oldest"}}),
        400,
        "invalid_request",
        "fields",
    )
    assert EndUser.objects.filter(pk=new.pk).exists()


def test_an_identify_merging_two_billing_ids_flags_the_survivor(tenant, segment):
    bare = bare_user(tenant, "x@example.com", billing_id="cus_BARE1", occurred_at=at(0))
    response = segment.identify("1", {"billingUserId": "cus_ONE22"}, timestamp=iso(1))
    assert response.status_code == 200, response.content
    assert segment.identify("1", {"email": "x@example.com"}, timestamp=iso(2)).status_code == 200
    survivor = EndUser.objects.get(identities__external_id="1")
    assert survivor.pk == bare.pk  # created first
    assert survivor.billing_id == "cus_ONE22"
    assert "billing_conflict" in flags(survivor)
    record = MergeRecord.objects.get(survivor_key=survivor.pk)
    assert record.reason == "identify" and record.billing_conflict
    # Both billing ids are in the ledger: the dropped one in the conflict and the snapshot.
    assert {record.conflicts[0]["survivor"], record.conflicts[0]["absorbed"]} == {"cus_BARE1", "cus_ONE22"}
    listed = ApiClient(tenant).get("users", {"flag": "billing_conflict"}).json()["results"]
    assert [u["id"] for u in listed] == [survivor.pk]
    assert "billing_conflict" in listed[0]["flags"]


def test_an_identify_merging_one_billing_id_is_no_conflict(tenant, segment):
    bare_user(tenant, "x@example.com", billing_id="cus_BARE1", occurred_at=at(0))
    assert segment.identify("1", {"name": "One"}, timestamp=iso(1)).status_code == 200
    assert segment.identify("1", {"email": "x@example.com"}, timestamp=iso(2)).status_code == 200
    survivor = EndUser.objects.get(identities__external_id="1")
    assert survivor.billing_id == "cus_BARE1" and "billing_conflict" not in flags(survivor)
