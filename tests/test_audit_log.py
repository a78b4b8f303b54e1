"""The audit log: every admin action, with its actor, written in the action's transaction."""

import io

import pytest
from django.db import transaction

from features.models import Event, Feature
from features.services import FeatureError, feature_delete
from kana import audit
from kana.models import ApiKey, AuditEntry, Workspace
from kana.services import api_key_issue, api_key_revoke, key_prefix, workspace_settings_update
from users.models import EndUser, MergeRecord, Suppression
from users.selectors import user_pk_for
from users.services import delete_user, merge_undo

from .api_support import ApiClient, assert_error, assert_page, feature, identify, rule, track
from .csv_helpers import csv_bytes


def _actions(tenant) -> list[tuple[str, str]]:
    entries = AuditEntry.objects.for_workspace(tenant.workspace).exclude(action="key.create").order_by("pk")
    return [(e.action, e.actor) for e in entries]


def test_api_admin_actions_are_recorded_with_the_key(tenant):
    api = ApiClient(tenant)
    actor = f"api-key:{key_prefix(tenant.key)}"
    assert api.post("features", {"id": "exports", "name": "Exports"}).status_code == 201
    assert api.patch("features/exports", {"name": "Report exports"}).status_code == 200
    created = api.post("rules", {"name": "r", "feature": "exports", "event": "Exported"})
    assert created.status_code == 201, created.content
    rule_id = created.json()["id"]
    assert api.patch(f"rules/{rule_id}", {"name": "renamed"}).status_code == 200
    assert api.delete(f"rules/{rule_id}").status_code == 204
    assert api.delete("features/exports").status_code == 204
    first, second = identify(tenant, "u1"), identify(tenant, "u2")
    assert api.patch(f"users/{first.pk}", {"email": "ada@example.com"}).status_code == 200
    assert api.post("users/merge", {"user_ids": [first.pk, second.pk]}).status_code == 200
    assert api.delete(f"users/{first.pk}").status_code == 204
    track(tenant, "u3", "Clicked")
    event = Event.objects.for_workspace(tenant.workspace).get(name="Clicked")
    assert api.post(f"events/{event.pk}/void", {"reason": "bot"}).status_code == 200

    assert _actions(tenant) == [
        (action, actor)
        for action in (
            "feature.create",
            "feature.update",
            "rule.create",
            "rule.update",
            "rule.delete",
            "feature.delete",
            "user.update",
            "merge",
            "user.delete",
            "event.void",
        )
    ]
    update = AuditEntry.objects.get(action="user.update")
    assert (update.object_type, update.object_id) == ("user", str(first.pk))
    assert (update.before, update.after) == ({"email": ""}, {"email": "ada@example.com"})
    renamed = AuditEntry.objects.get(action="feature.update")
    assert (renamed.before["name"], renamed.after["name"]) == ("Exports", "Report exports")


def test_keys_and_csv_applies_are_recorded(tenant):
    issued = api_key_issue(workspace=tenant.workspace, name="ci", actor="user:ada")
    api_key_revoke(api_key=issued.api_key, actor="user:ada")
    api_key_revoke(api_key=issued.api_key, actor="user:ada")  # revoked already: nothing new
    api = ApiClient(tenant)
    upload = {"file": io.BytesIO(csv_bytes([{"user_id": "c1", "email": "c1@example.com"}]))}
    headers = {"HTTP_AUTHORIZATION": f"Bearer {tenant.key}"}
    dry = api.client.post("/api/v1/users/import?dry_run=true", upload, **headers)
    assert dry.status_code == 200, dry.content
    upload["file"].seek(0)
    applied = api.client.post("/api/v1/users/import", upload, **headers)
    assert applied.status_code == 200, applied.content

    entries = AuditEntry.objects.for_workspace(tenant.workspace).order_by("pk")
    assert [(e.action, e.actor) for e in entries][1:] == [
        ("key.create", "user:ada"),
        ("key.revoke", "user:ada"),
        ("csv.apply", f"api-key:{key_prefix(tenant.key)}"),
    ], "the dry run is not an applied change"
    csv_apply = entries.last()
    assert csv_apply.object_id == str(applied.json()["id"]) and csv_apply.after["created"] == 1


def test_dashboard_actions_name_the_admin(tenant, member, member_client):
    response = member_client.post("/features/", {"key": "exports", "name": "Exports", "type": "CONSUMABLE"})
    assert response.status_code == 302, response.content
    user = identify(tenant, "u1")
    assert member_client.post(f"/users/{user.pk}/delete/").status_code == 302
    assert _actions(tenant) == [
        ("feature.create", f"user:{member.username}"),
        ("user.delete", f"user:{member.username}"),
    ]


def test_a_refused_action_leaves_no_entry(tenant):
    feature(tenant, "exports")
    rule(tenant, "exports", "Exported")
    entries_before = AuditEntry.objects.for_workspace(tenant.workspace).count()
    with pytest.raises(FeatureError) as refused:
        feature_delete(
            workspace=tenant.workspace, feature=Feature.objects.for_workspace(tenant.workspace).get(key="exports")
        )
    assert refused.value.code == "feature_in_use"
    assert AuditEntry.objects.for_workspace(tenant.workspace).count() == entries_before
    assert_error(ApiClient(tenant).delete("features/exports"), 409, "feature_in_use")
    assert not AuditEntry.objects.filter(action="feature.delete").exists()


def fail_after_the_audit_row(monkeypatch) -> None:
    """Make every action fail right after writing its audit entry, inside its transaction."""
    real_record = audit.record

    def record_then_fail(*args, **kwargs):
        real_record(*args, **kwargs)
        raise RuntimeError("injected after the audit row")

    monkeypatch.setattr(audit, "record", record_then_fail)


def test_an_action_that_rolls_back_after_its_entry_leaves_none(tenant, monkeypatch):
    user = identify(tenant, "u1")
    fail_after_the_audit_row(monkeypatch)
    with pytest.raises(RuntimeError):
        delete_user(workspace=tenant.workspace, user_pk=user.pk, actor="cli")
    assert EndUser.objects.filter(pk=user.pk).exists(), "the delete rolled back"
    assert not AuditEntry.objects.filter(action="user.delete").exists()


def test_record_refuses_to_run_outside_a_transaction(tenant):
    # pytest's database fixture wraps each test in a transaction; leave it to see the check.
    with pytest.raises(RuntimeError):
        connection = transaction.get_connection()
        saved, connection.in_atomic_block = connection.in_atomic_block, False
        try:
            audit.record(tenant.workspace, "cli", "merge", 1)
        finally:
            connection.in_atomic_block = saved


def test_the_api_lists_entries_newest_first_with_filters(tenant, other_tenant):
    feature(tenant, "exports")
    feature(tenant, "seats")
    feature(other_tenant, "secret")
    api = ApiClient(tenant)

    entries = assert_page(api.get("audit").json())
    assert [(e["action"], e["object_id"]) for e in entries] == [
        ("feature.create", "seats"),
        ("feature.create", "exports"),
        ("key.create", str(ApiKey.objects.get(workspace=tenant.workspace).pk)),
    ]
    assert set(entries[0]) == {"id", "actor", "action", "object_type", "object_id", "before", "after", "created_at"}
    assert entries[0]["after"]["key"] == "seats"
    only = api.get("audit", {"action": "feature.create", "page_size": 1}).json()
    assert only["count"] == 2 and only["results"][0]["object_id"] == "seats"
    assert api.get("audit", {"object_type": "api_key"}).json()["count"] == 1
    assert "secret" not in str(api.get("audit").json()), "another workspace's entries never show"


def test_the_dashboard_page_lists_the_workspaces_entries(tenant, other_tenant, member_client):
    feature(tenant, "exports")
    feature(other_tenant, "secret")

    page = member_client.get("/audit/")

    assert page.status_code == 200
    assert b"Audit log" in page.content and b"feature.create" in page.content and b"exports" in page.content
    assert b"secret" not in page.content
    assert b'href="/audit/"' in member_client.get("/users/").content, "a nav link"
    filtered = member_client.get("/audit/", {"action": "key.create"})
    assert b"exports" not in filtered.content


def _merged(tenant):
    """u1 <- u2 merged by the API, then u3 <- u1 (so undoing the first waits for the second)."""
    api = ApiClient(tenant)
    first, second, third = identify(tenant, "u1"), identify(tenant, "u2"), identify(tenant, "u3")
    assert api.post("users/merge", {"user_ids": [first.pk, second.pk], "survivor": first.pk}).status_code == 200
    assert api.post("users/merge", {"user_ids": [third.pk, first.pk], "survivor": third.pk}).status_code == 200
    return api, MergeRecord.objects.get(absorbed_id=second.pk), MergeRecord.objects.get(absorbed_id=first.pk)


def test_a_merge_undo_is_recorded_and_a_refused_one_is_not(tenant):
    api, older, newer = _merged(tenant)
    assert_error(api.post(f"merges/{older.pk}/undo"), 409, "merge_not_undoable")
    assert not AuditEntry.objects.filter(action="merge.undo").exists()

    assert api.post(f"merges/{newer.pk}/undo").status_code == 200
    entry = AuditEntry.objects.get(action="merge.undo")
    assert (entry.actor, entry.object_type, entry.object_id) == (
        f"api-key:{key_prefix(tenant.key)}",
        "merge",
        str(newer.pk),
    )
    assert entry.before["absorbed"] == newer.absorbed_id and entry.after["restored"] == newer.absorbed_id
    # Undoing it again changes nothing and records nothing.
    assert api.post(f"merges/{newer.pk}/undo").json()["already_undone"] is True
    assert AuditEntry.objects.filter(action="merge.undo").count() == 1


def test_a_merge_undo_that_rolls_back_after_its_entry_leaves_none(tenant, monkeypatch):
    _api, _older, newer = _merged(tenant)
    fail_after_the_audit_row(monkeypatch)
    with pytest.raises(RuntimeError):
        merge_undo(workspace=tenant.workspace, merge_id=newer.pk, actor="cli")
    assert MergeRecord.objects.get(pk=newer.pk).undone_at is None, "the undo rolled back"
    assert not AuditEntry.objects.filter(action="merge.undo").exists()


@pytest.mark.parametrize(
    "action, run",
    [
        (
            "workspace.update",
            lambda t: workspace_settings_update(workspace=t.workspace, changes={"anonymous_hold_days": 9}),
        ),
        ("user.delete", lambda t: delete_user(workspace=t.workspace, user_pk=user_pk_for(t.workspace, "gone"))),
    ],
)
def test_the_trust_actions_that_roll_back_after_their_entry_leave_none(tenant, monkeypatch, action, run):
    identify(tenant, "gone")
    fail_after_the_audit_row(monkeypatch)
    with pytest.raises(RuntimeError):
        run(tenant)
    assert not AuditEntry.objects.filter(action=action).exists()
    assert not Suppression.objects.exists() and EndUser.objects.filter(user_id="gone").exists()
    assert Workspace.objects.get(pk=tenant.workspace.pk).anonymous_hold_days == 30
