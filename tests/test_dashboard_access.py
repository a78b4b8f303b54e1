"""Dashboard access: sign-in required, CSRF on every POST, one workspace per page."""

import pytest
from django.test import Client
from django.utils import timezone

from features.models import Feature, MappingRule
from features.services import RuleDefinition, feature_create, rule_create
from kana.models import ApiKey
from tests.conftest import ADMIN_PASSWORD, make_member
from users.models import EndUser
from users.profile import ProfileChanges
from users.services import identify_user

PAGES = ["/", "/users/", "/duplicates/", "/features/", "/rules/", "/rules/new/", "/unmapped/", "/csv/", "/workspaces/"]


def _user(workspace, user_id, email=""):
    changes = ProfileChanges(email=email) if email else ProfileChanges()
    return identify_user(workspace=workspace, user_id=user_id, changes=changes, occurred_at=timezone.now()).user


@pytest.mark.parametrize("url", PAGES)
def test_it_sends_anonymous_visitors_to_sign_in(client, db, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={url}"


def test_it_requires_sign_in_for_posts_and_json(client, tenant):
    user = _user(tenant.workspace, "u1")
    assert client.post(f"/users/{user.pk}/delete/").status_code == 302
    assert EndUser.objects.filter(pk=user.pk).exists()
    assert client.post("/keys/", {"name": "x"}).status_code == 302
    assert client.get("/rules/1/progress/").status_code == 302


def test_it_signs_in_with_the_login_form_and_out_with_a_post(client, member):
    page = client.get("/login/")
    assert page.status_code == 200 and b"Sign in" in page.content
    bad = client.post("/login/", {"username": "ada", "password": "wrong"})
    assert bad.status_code == 200 and b"Please enter a correct username" in bad.content
    good = client.post("/login/", {"username": "ada", "password": ADMIN_PASSWORD})
    assert good.status_code == 302 and good["Location"] == "/"
    assert client.get("/").status_code == 200
    assert client.get("/logout/").status_code == 405  # Django signs out by POST only
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302


def _csrf_client(member) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(member)
    return client


def test_it_refuses_posts_without_a_csrf_token(member, tenant):
    client = _csrf_client(member)
    user = _user(tenant.workspace, "u1")
    keys_before = ApiKey.objects.count()
    assert client.post("/keys/", {"name": "ci"}).status_code == 403
    assert client.post(f"/users/{user.pk}/delete/").status_code == 403
    assert client.post("/features/", {"key": "x", "type": "BINARY"}).status_code == 403
    assert client.post("/duplicates/merge/", {"users": [user.pk]}).status_code == 403
    assert client.post("/logout/").status_code == 403
    assert ApiKey.objects.count() == keys_before
    assert EndUser.objects.filter(pk=user.pk).exists()
    assert not Feature.objects.exists()


def test_it_accepts_posts_with_the_token_from_the_page(member, tenant):
    client = _csrf_client(member)
    page = client.get("/")
    token = page.cookies["csrftoken"].value
    assert b'name="csrfmiddlewaretoken"' in page.content
    response = client.post("/keys/", {"name": "ci", "csrfmiddlewaretoken": token})
    assert response.status_code == 200
    assert ApiKey.objects.filter(workspace=tenant.workspace, name="ci").exists()


def test_a_login_without_workspace_sees_nothing(client, db):
    from django.contrib.auth import get_user_model

    loner = get_user_model().objects.create_user(username="loner", password=ADMIN_PASSWORD)
    client.force_login(loner)
    response = client.get("/users/")
    assert response.status_code == 403
    assert b"not a member of any Kana workspace" in response.content


@pytest.fixture
def foreign(other_tenant):
    """Objects of workspace B that an admin of workspace A must never reach."""
    workspace = other_tenant.workspace
    user = _user(workspace, "b-user", "b@example.com")
    twin = _user(workspace, "b-twin", "b@example.com")
    feature_create(workspace=workspace, key="b-feature")
    rule = rule_create(
        workspace=workspace, definition=RuleDefinition(name="b", feature_key="b-feature", event_name="X")
    )
    key = ApiKey.objects.get(workspace=workspace)
    return {"user": user, "twin": twin, "rule": rule, "key": key}


def test_objects_of_another_workspace_are_not_found(member_client, tenant, foreign):
    user, twin, rule, key = foreign["user"], foreign["twin"], foreign["rule"], foreign["key"]
    mine = _user(tenant.workspace, "a-user", "b@example.com")
    for url in [
        f"/users/{user.pk}/",
        f"/users/{user.pk}/delete/",
        f"/rules/{rule.pk}/progress/",
        f"/duplicates/preview/?users={user.pk}&users={twin.pk}",
        f"/duplicates/preview/?users={mine.pk}&users={user.pk}",
    ]:
        assert member_client.get(url).status_code == 404, url
    assert member_client.post(f"/users/{user.pk}/delete/").status_code == 404
    assert member_client.post(f"/keys/{key.pk}/revoke/").status_code == 404
    assert member_client.post(f"/rules/{rule.pk}/active/").status_code == 404
    assert member_client.post("/duplicates/merge/", {"users": [mine.pk, user.pk]}).status_code == 404
    assert member_client.post("/duplicates/merge/", {"users": [user.pk, twin.pk]}).status_code == 404
    # Nothing of B changed.
    assert EndUser.objects.filter(pk__in=[user.pk, twin.pk, mine.pk]).count() == 3
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None
    assert MappingRule.objects.get(pk=rule.pk).active


def test_lists_show_only_the_workspace_s_own_rows(member_client, tenant, foreign):
    _user(tenant.workspace, "a-user")
    users = member_client.get("/users/?q=user").content.decode()
    assert "a-user" in users and "b-user" not in users
    assert "b@example.com" not in member_client.get("/duplicates/").content.decode()
    assert "b-feature" not in member_client.get("/features/").content.decode()
    assert "b-feature" not in member_client.get("/rules/").content.decode()
    assert foreign["key"].prefix not in member_client.get("/").content.decode()


def test_an_admin_of_several_workspaces_picks_one(client, tenant, other_tenant):
    admin = make_member(tenant.workspace, "multi")
    other_tenant.workspace.members.add(admin)
    _user(tenant.workspace, "in-a")
    _user(other_tenant.workspace, "in-b")
    client.force_login(admin)
    assert client.get("/users/")["Location"] == "/workspaces/"
    picker = client.get("/workspaces/").content.decode()
    assert "Acme" in picker and "Other Co" in picker
    assert client.post("/workspaces/", {"workspace": other_tenant.workspace.pk}).status_code == 302
    listing = client.get("/users/").content.decode()
    assert "in-b" in listing and "in-a" not in listing
    client.post("/workspaces/", {"workspace": tenant.workspace.pk})
    listing = client.get("/users/").content.decode()
    assert "in-a" in listing and "in-b" not in listing


def test_an_admin_cannot_pick_a_workspace_it_is_not_a_member_of(member_client, other_tenant):
    assert member_client.post("/workspaces/", {"workspace": other_tenant.workspace.pk}).status_code == 404
    assert member_client.post("/workspaces/", {"workspace": "nonsense"}).status_code == 404
    page = member_client.get("/").content.decode()
    assert "Acme" in page and "Other Co" not in page
