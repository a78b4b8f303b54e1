"""GET/PATCH /api/v1/workspace and the dashboard's settings page (SPEC §12)."""

import pytest
from django.test import Client

from kana.models import AuditEntry, Workspace
from kana.services import key_prefix

from .api_support import ApiClient, assert_error

SETTINGS = {
    "name": "Acme",
    "anonymous_events": "reject",
    "anonymous_hold_days": 30,
    "anonymous_pending": 0,
    "anonymous_expired": 0,
}


def test_it_shows_the_keys_own_workspace(tenant, other_tenant):
    body = ApiClient(tenant).get("workspace").json()
    assert body == {**SETTINGS, "id": tenant.workspace.pk}
    assert ApiClient(other_tenant).get("workspace").json()["id"] == other_tenant.workspace.pk


def test_it_changes_settings_and_records_them_in_the_audit_log(tenant, other_tenant):
    api = ApiClient(tenant)
    response = api.patch("workspace", {"anonymous_events": "hold", "anonymous_hold_days": 7})
    assert response.status_code == 200, response.content
    assert response.json() == {
        **SETTINGS,
        "id": tenant.workspace.pk,
        "anonymous_events": "hold",
        "anonymous_hold_days": 7,
    }
    assert api.get("workspace").json()["anonymous_hold_days"] == 7
    entry = AuditEntry.objects.get(workspace=tenant.workspace, action="workspace.update")
    assert (entry.actor, entry.object_type, entry.object_id) == (
        f"api-key:{key_prefix(tenant.key)}",
        "workspace",
        str(tenant.workspace.pk),
    )
    assert (entry.before, entry.after) == (
        {"anonymous_events": "reject", "anonymous_hold_days": 30},
        {"anonymous_events": "hold", "anonymous_hold_days": 7},
    )
    # Nothing changed: nothing recorded. Another workspace is untouched.
    assert api.patch("workspace", {"anonymous_events": "hold"}).status_code == 200
    assert AuditEntry.objects.filter(action="workspace.update").count() == 1
    assert Workspace.objects.get(pk=other_tenant.workspace.pk).anonymous_events == "reject"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"anonymous_events": "drop"}, "anonymous_events"),
        ({"anonymous_hold_days": 0}, "anonymous_hold_days"),
        ({"anonymous_hold_days": 366}, "anonymous_hold_days"),
        ({"anonymous_hold_days": "30"}, "anonymous_hold_days"),
        ({"name": ""}, "name"),
    ],
)
def test_it_refuses_bad_settings(tenant, body, field):
    assert_error(ApiClient(tenant).patch("workspace", body), 400, "invalid_request", field)
    assert Workspace.objects.get(pk=tenant.workspace.pk).anonymous_hold_days == 30
    assert not AuditEntry.objects.filter(action="workspace.update").exists()


def test_it_needs_a_key(db):
    assert ApiClient(None, auth="").get("workspace").status_code == 401


def test_the_settings_page_saves_with_its_csrf_token(member, tenant):
    client = Client(enforce_csrf_checks=True)
    client.force_login(member)
    page = client.get("/settings/")
    assert page.status_code == 200 and b'href="/settings/"' in page.content
    form = {"name": "Acme Inc", "anonymous_events": "hold", "anonymous_hold_days": "14"}
    assert client.post("/settings/", form).status_code == 403  # no token
    response = client.post("/settings/", {**form, "csrfmiddlewaretoken": page.cookies["csrftoken"].value})
    assert response.status_code == 302
    workspace = Workspace.objects.get(pk=tenant.workspace.pk)
    assert (workspace.name, workspace.anonymous_events, workspace.anonymous_hold_days) == ("Acme Inc", "hold", 14)
    assert AuditEntry.objects.get(action="workspace.update").actor == f"user:{member.get_username()}"


def test_the_settings_page_refuses_days_out_of_range(member_client, tenant):
    response = member_client.post(
        "/settings/", {"name": "Acme", "anonymous_events": "hold", "anonymous_hold_days": "0"}
    )
    assert response.status_code == 400 and b"errorlist" in response.content
    assert Workspace.objects.get(pk=tenant.workspace.pk).anonymous_events == "reject"
