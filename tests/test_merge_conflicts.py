"""A merge preview lists conflicting values (SPEC §12), instead of letting the newest win silently."""

from datetime import timedelta

import pytest

from users.conflicts import merge_conflicts
from users.models import EndUser
from users.profile import merge_preview

from .csv_helpers import T0, identify

pytestmark = pytest.mark.django_db


def conflicts_of(users, survivor_pk=None) -> list[dict]:
    preview = merge_preview(users, survivor_pk=survivor_pk)
    return [c.as_dict() for c in merge_conflicts(preview.survivor, preview.absorbed, preview.result)]


def test_two_billing_ids_are_a_conflict_and_the_newest_is_kept(tenant):
    old = identify(tenant.workspace, "laptop", email="kim@example.com", billing_id="cus_OLD", at=T0)
    new = identify(tenant.workspace, "phone", email="KIM@example.com", billing_id="cus_NEW", at=T0 + timedelta(days=1))
    assert conflicts_of([old, new]) == [
        {"field": "billing_id", "survivor": "cus_OLD", "absorbed": "cus_NEW", "kept": "cus_NEW"}
    ]
    # The other survivor: same values, same winner (the most recently set), sides swapped.
    assert conflicts_of([old, new], survivor_pk=new.pk) == [
        {"field": "billing_id", "survivor": "cus_NEW", "absorbed": "cus_OLD", "kept": "cus_NEW"}
    ]


def test_a_blank_filled_from_the_other_user_or_an_email_in_other_case_is_no_conflict(tenant):
    a = identify(tenant.workspace, "a", email="jo@example.com", name="Jo", at=T0)
    b = identify(tenant.workspace, "b", email="JO@Example.com", billing_id="cus_B", at=T0)
    assert conflicts_of([a, b]) == []


def test_every_field_and_every_absorbed_user_is_listed(tenant):
    a = identify(tenant.workspace, "a", email="x@example.com", name="Ann", at=T0)
    b = identify(tenant.workspace, "b", email="x@example.com", name="Annie", billing_id="cus_B", at=T0 + timedelta(1))
    c = identify(tenant.workspace, "c", email="x@example.com", name="A.", billing_id="cus_C", at=T0 + timedelta(2))
    conflicts = conflicts_of([a, b, c])
    assert conflicts == [
        {"field": "name", "survivor": "Ann", "absorbed": "Annie", "kept": "A."},
        {"field": "name", "survivor": "Ann", "absorbed": "A.", "kept": "A."},
        {"field": "billing_id", "survivor": "", "absorbed": "cus_B", "kept": "cus_C"},
        {"field": "billing_id", "survivor": "", "absorbed": "cus_C", "kept": "cus_C"},
    ]


def test_the_preview_page_lists_the_conflicts_and_the_merge_keeps_what_it_said(member_client, tenant):
    old = identify(tenant.workspace, "laptop", email="kim@example.com", billing_id="cus_OLD", at=T0)
    new = identify(tenant.workspace, "phone", email="kim@example.com", billing_id="cus_NEW", at=T0 + timedelta(1))

    response = member_client.get(f"/duplicates/preview/?users={old.pk}&users={new.pk}")
    page = response.content.decode()
    assert 'id="merge-conflicts"' in page and "1 conflicting value" in page
    assert [c.as_dict() for c in response.context["conflicts"]] == [
        {"field": "billing_id", "survivor": "cus_OLD", "absorbed": "cus_NEW", "kept": "cus_NEW"}
    ]
    assert "newest wins" in page and "Merge 2 users (newest values kept)" in page

    member_client.post("/duplicates/merge/", {"users": [old.pk, new.pk]})
    assert EndUser.objects.for_workspace(tenant.workspace).get().billing_id == "cus_NEW"


def test_the_preview_can_keep_either_side_per_field_and_the_merge_does_so(member_client, tenant):
    old = identify(tenant.workspace, "laptop", email="kim@example.com", billing_id="cus_OLD", at=T0)
    new = identify(tenant.workspace, "phone", email="kim@example.com", billing_id="cus_NEW", at=T0 + timedelta(1))

    response = member_client.get(f"/duplicates/preview/?users={old.pk}&users={new.pk}&keep_billing_id=survivor")
    page = response.content.decode()
    assert [c.as_dict()["kept"] for c in response.context["conflicts"]] == ["cus_OLD"]
    assert '<option value="survivor" selected>' in page and "Merge 2 users (chosen values kept)" in page
    assert '<input type="hidden" name="keep_billing_id" value="survivor">' in page

    member_client.post("/duplicates/merge/", {"users": [old.pk, new.pk], "keep_billing_id": "survivor"})
    assert EndUser.objects.for_workspace(tenant.workspace).get().billing_id == "cus_OLD"


def test_no_conflict_no_conflicts_box(member_client, tenant):
    a = identify(tenant.workspace, "a", email="jo@example.com", name="Jo", at=T0)
    b = identify(tenant.workspace, "b", email="jo@example.com", at=T0)
    page = member_client.get(f"/duplicates/preview/?users={a.pk}&users={b.pk}").content.decode()
    assert 'id="merge-conflicts"' not in page and "Merge 2 users</button>" in page
