"""POST /api/v1/merges/{id}/undo: the absorbed user comes back as it was (SPEC §12, "Unmerge")."""

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections

from features.models import Event, Usage
from features.selectors import usage_totals
from users.models import EndUser, GroupMembership, MergeRecord, UserIdentity

from .api_support import ApiClient, assert_error, feature, identify, track
from .conftest import SegmentClient, requires_postgres
from .identity_support import at, bare_user, iso, user_for


def group(tenant, user_id: str, group_id: str):
    response = SegmentClient(tenant).post("/v1/group", {"userId": user_id, "groupId": group_id, "traits": {}})
    assert response.status_code == 200, response.content


def totals_by_user_id(tenant) -> dict:
    """usage_totals keyed by each user's userIds (Kana ids differ between workspaces)."""
    totals = {}
    for row in usage_totals(tenant.workspace):
        ids = UserIdentity.objects.filter(user_id=row["user_pk"]).values_list("external_id", flat=True)
        totals[(tuple(sorted(ids)), row["feature"])] = row["total"]
    return totals


def history(tenant, *, merge: bool):
    """A and B with fields, groups and usage; merged (A <- B) halfway when ``merge``."""
    feature(tenant, "exports")
    a = identify(tenant, "a", name="Ada", billingUserId="cus_AAA1")
    b = identify(tenant, "b", name="Bob", email="bob@example.com", billingUserId="cus_BBB2")
    group(tenant, "b", "team-b")
    group(tenant, "a", "team-ab")
    group(tenant, "b", "team-ab")
    track(tenant, "a", "Exported", featureId="exports", delta=2)
    track(tenant, "b", "Exported", featureId="exports", delta=3)
    record = None
    if merge:
        response = ApiClient(tenant).post("users/merge", {"user_ids": [a.pk, b.pk]})
        assert response.status_code == 200, response.content
        record = MergeRecord.objects.get(absorbed_id=b.pk)
    track(tenant, "b", "Exported", featureId="exports", delta=5)
    track(tenant, "a", "Exported", featureId="exports", delta=7)
    return a, b, record


def test_it_restores_the_absorbed_user_with_its_ids_fields_groups_events_and_usage(tenant, other_tenant):
    a, b, record = history(tenant, merge=True)
    merged = EndUser.objects.get(pk=a.pk)
    assert merged.billing_id == "cus_BBB2" and merged.name == "Bob"  # newest won

    response = ApiClient(tenant).post(f"merges/{record.pk}/undo")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["already_undone"] is False
    assert body["restored"]["id"] == b.pk and body["restored"]["user_ids"] == ["b"]
    assert body["survivor"]["id"] == a.pk and body["survivor"]["user_ids"] == ["a"]
    assert body["merge"]["undone_at"] and body["merge"]["undone_by"].startswith("api-key:")

    restored, survivor = EndUser.objects.get(pk=b.pk), EndUser.objects.get(pk=a.pk)
    assert (restored.user_id, restored.name, restored.email, restored.billing_id) == (
        "b",
        "Bob",
        "bob@example.com",
        "cus_BBB2",
    )
    assert (restored.created_at, restored.name_set_at) == (b.created_at, b.name_set_at)
    # The survivor gets back what the merge took from B (nothing changed it since).
    assert (survivor.user_id, survivor.name, survivor.email, survivor.billing_id) == ("a", "Ada", "", "cus_AAA1")
    assert sorted(GroupMembership.objects.filter(user=restored).values_list("group__group_id", flat=True)) == [
        "team-ab",
        "team-b",
    ]
    assert list(GroupMembership.objects.filter(user=survivor).values_list("group__group_id", flat=True)) == ["team-ab"]
    assert set(Event.objects.filter(external_user_id="b").values_list("user_id", flat=True)) == {b.pk}
    assert set(Event.objects.filter(external_user_id="a").values_list("user_id", flat=True)) == {a.pk}
    assert not Usage.objects.filter(user=survivor, event__external_user_id="b").exists()

    # Exactly as if the merge had never happened.
    history(other_tenant, merge=False)
    assert totals_by_user_id(tenant) == totals_by_user_id(other_tenant)
    assert totals_by_user_id(tenant) == {
        (("a",), "exports"): 9,
        (("b",), "exports"): 8,
    }
    # New messages for "b" land on the restored user.
    track(tenant, "b", "Exported", featureId="exports", delta=1)
    assert Usage.objects.filter(user=restored).count() == 3


def test_undoing_twice_changes_nothing_and_answers_the_same(tenant):
    a, b, record = history(tenant, merge=True)
    api = ApiClient(tenant)
    first = api.post(f"merges/{record.pk}/undo").json()
    state = (list(EndUser.objects.order_by("pk").values()), list(Event.objects.order_by("pk").values("user_id")))
    again = api.post(f"merges/{record.pk}/undo")
    assert again.status_code == 200, again.content
    body = again.json()
    assert body["already_undone"] is True
    assert {k: v for k, v in body.items() if k != "already_undone"} == {
        k: v for k, v in first.items() if k != "already_undone"
    }
    assert (
        list(EndUser.objects.order_by("pk").values()),
        list(Event.objects.order_by("pk").values("user_id")),
    ) == state


def test_an_identify_merge_of_a_bare_user_is_undone_and_the_canonical_user_id_goes_back(tenant, segment):
    bare = bare_user(tenant, "x@example.com", name="Bare", occurred_at=at(0))
    feature(tenant, "exports")
    assert segment.identify("1", {"name": "One"}, timestamp=iso(1)).status_code == 200
    one = user_for(tenant, "1")
    track(tenant, "1", "Exported", featureId="exports", delta=4)
    assert segment.identify("1", {"email": "x@example.com"}, timestamp=iso(2)).status_code == 200
    record = MergeRecord.objects.get(absorbed_id=one.pk)
    assert record.survivor_key == bare.pk and EndUser.objects.get(pk=bare.pk).user_id == "1"
    track(tenant, "1", "Exported", featureId="exports", delta=6)

    assert ApiClient(tenant).post(f"merges/{record.pk}/undo").status_code == 200

    restored, survivor = EndUser.objects.get(pk=one.pk), EndUser.objects.get(pk=bare.pk)
    assert restored.user_id == "1" and user_for(tenant, "1").pk == one.pk
    # The survivor took "1" as canonical in the merge: it is bare again.
    assert survivor.user_id is None and not UserIdentity.objects.filter(user=survivor).exists()
    assert survivor.email == "x@example.com" and survivor.name == "Bare"
    assert {r["user_pk"]: r["total"] for r in usage_totals(tenant.workspace)} == {one.pk: 10}


def test_chained_merges_are_undone_newest_first(tenant):
    a, b, c = identify(tenant, "a"), identify(tenant, "b"), identify(tenant, "c")
    api = ApiClient(tenant)
    api.post("users/merge", {"user_ids": [a.pk, b.pk], "survivor": a.pk})
    api.post("users/merge", {"user_ids": [c.pk, a.pk], "survivor": c.pk})
    first = MergeRecord.objects.get(absorbed_id=b.pk)
    second = MergeRecord.objects.get(absorbed_id=a.pk)

    refusal = assert_error(api.post(f"merges/{first.pk}/undo"), 409, "merge_not_undoable")
    assert f"merge {second.pk}" in refusal["message"]
    assert not EndUser.objects.filter(pk=b.pk).exists() and MergeRecord.objects.get(pk=first.pk).undone_at is None

    assert api.post(f"merges/{second.pk}/undo").status_code == 200
    assert sorted(UserIdentity.objects.filter(user_id=a.pk).values_list("external_id", flat=True)) == ["a", "b"]
    assert MergeRecord.objects.get(pk=first.pk).survivor_key == a.pk  # handed back to A
    assert api.post(f"merges/{first.pk}/undo").status_code == 200
    assert [user_for(tenant, uid).pk for uid in "abc"] == [a.pk, b.pk, c.pk]
    # A restored user can be merged again: the undone row does not count.
    assert api.post("users/merge", {"user_ids": [a.pk, b.pk]}).json()["absorbed_ids"] == [b.pk]


def test_an_unknown_merge_is_404_and_another_workspaces_merge_too(tenant, other_tenant):
    a, b = identify(tenant, "a"), identify(tenant, "b")
    ApiClient(tenant).post("users/merge", {"user_ids": [a.pk, b.pk]})
    record = MergeRecord.objects.get(absorbed_id=b.pk)
    assert ApiClient(other_tenant).post(f"merges/{record.pk}/undo").status_code == 404
    assert ApiClient(tenant).post("merges/999999/undo").status_code == 404
    assert not EndUser.objects.filter(pk=b.pk).exists()


def test_undoing_an_identify_billing_conflict_clears_the_flag(tenant, segment):
    bare_user(tenant, "x@example.com", billing_id="cus_BARE1", occurred_at=at(0))
    assert segment.identify("1", {"billingUserId": "cus_ONE22"}, timestamp=iso(1)).status_code == 200
    assert segment.identify("1", {"email": "x@example.com"}, timestamp=iso(2)).status_code == 200
    record = MergeRecord.objects.get()
    api = ApiClient(tenant)
    assert "billing_conflict" in api.get(f"users/{record.survivor_key}").json()["flags"]
    api.post(f"merges/{record.pk}/undo")
    assert "billing_conflict" not in api.get(f"users/{record.survivor_key}").json()["flags"]


def in_parallel(calls) -> list[int]:
    """Run every call at once, one thread (and PostgreSQL connection) each; statuses back."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        try:
            barrier.wait(timeout=30)
            return call().status_code
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


@requires_postgres
@pytest.mark.postgres
def test_a_concurrent_identify_and_track_during_the_undo_leave_a_consistent_state(transactional_db, tenant):
    feature(tenant, "exports")
    for round_no in range(3):
        a, b = identify(tenant, f"a{round_no}"), identify(tenant, f"b{round_no}")
        ApiClient(tenant).post("users/merge", {"user_ids": [a.pk, b.pk]})
        record = MergeRecord.objects.get(absorbed_id=b.pk)
        uid = f"b{round_no}"
        undo = f"merges/{record.pk}/undo"
        calls = [
            lambda undo=undo: ApiClient(tenant).post(undo),
            lambda uid=uid: SegmentClient(tenant).identify(uid, {"name": "Late"}),
            lambda uid=uid: SegmentClient(tenant).track(uid, "Exported", {"featureId": "exports", "delta": 1}),
            lambda uid=uid: SegmentClient(tenant).track(uid, "Exported", {"featureId": "exports", "delta": 2}),
            lambda undo=undo: ApiClient(tenant).post(undo),
        ]
        statuses = in_parallel(calls)
        assert Counter(statuses) == {200: 5}, statuses

        owner = user_for(tenant, uid)
        assert owner.pk == b.pk and owner.user_id == uid
        assert MergeRecord.objects.filter(pk=record.pk, undone_at__isnull=False).count() == 1
        # Every event and usage row addressed to b is on the restored user, whenever it came.
        assert set(Event.objects.filter(external_user_id=uid).values_list("user_id", flat=True)) == {b.pk}
        assert set(Usage.objects.filter(event__external_user_id=uid).values_list("user_id", flat=True)) == {b.pk}
        assert Usage.objects.filter(user=b.pk).count() == 2
        assert list(UserIdentity.objects.filter(user=a.pk).values_list("external_id", flat=True)) == [f"a{round_no}"]


def test_the_user_pages_merge_history_has_an_undo_button(member_client, tenant):
    a, b = identify(tenant, "a"), identify(tenant, "b")
    ApiClient(tenant).post("users/merge", {"user_ids": [a.pk, b.pk]})
    record = MergeRecord.objects.get(absorbed_id=b.pk)
    url = f"/users/{a.pk}/merges/{record.pk}/undo/"
    assert f'action="{url}"' in member_client.get(f"/users/{a.pk}/").content.decode()
    response = member_client.post(url)
    assert response.status_code == 302
    assert user_for(tenant, "b").pk == b.pk
    assert MergeRecord.objects.get(pk=record.pk).undone_by == "user:ada"  # the actor, as the audit log names it
    page = member_client.get(f"/users/{a.pk}/").content.decode()
    assert "undone" in page and f'action="{url}"' not in page


def test_a_ledger_row_from_before_groups_and_stamps_were_recorded_restores_what_it_can(tenant):
    a, b = identify(tenant, "a"), identify(tenant, "b", name="Bob")
    group(tenant, "b", "team-b")
    ApiClient(tenant).post("users/merge", {"user_ids": [a.pk, b.pk]})
    record = MergeRecord.objects.get(absorbed_id=b.pk)
    old = {k: v for k, v in record.absorbed_snapshot.items() if k not in ("state", "groups", "survivor_before")}
    MergeRecord.objects.filter(pk=record.pk).update(absorbed_snapshot=old, merged_into=None)

    assert ApiClient(tenant).post(f"merges/{record.pk}/undo").status_code == 200
    restored = EndUser.objects.get(pk=b.pk)
    assert (restored.user_id, restored.name, restored.name_set_at) == ("b", "Bob", None)
    assert not GroupMembership.objects.filter(user=restored).exists()
    assert EndUser.objects.get(pk=a.pk).name == "Bob"  # nothing to tell what the survivor had
