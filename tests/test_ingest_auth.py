"""Who may send to the ingest endpoints, and that a workspace's key reaches only its own data."""

import base64
import gzip
import hashlib
import hmac
import json
import time
from types import SimpleNamespace

import pytest
from django.utils import timezone

from features.models import Event
from kana.models import ApiKey
from kana.services import api_key_issue, api_key_revoke

from .conftest import SegmentClient
from .identity_support import bare_user, counts, flags, ok, user_for

TRACK = {"userId": "1", "event": "Report Exported"}


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


@pytest.mark.parametrize("scheme", ["basic", "bearer", "bare"])
def test_it_accepts_the_key_in_the_authorization_header(segment, tenant, scheme):
    header = {"basic": basic(tenant.key), "bearer": f"Bearer {tenant.key}", "bare": tenant.key}[scheme]

    body = ok(segment.post("/v1/track", TRACK, auth=header))

    assert Event.objects.for_workspace(tenant.workspace).get(message_id=body["message_id"])


def test_it_accepts_basic_auth_with_a_password_segment_style(segment, tenant):
    header = "Basic " + base64.b64encode(f"{tenant.key}:ignored".encode()).decode()

    ok(segment.post("/v1/track", TRACK, auth=header))


@pytest.mark.parametrize("path", ["/v1/track", "/segment/events", "/v1/batch"])
def test_it_accepts_the_write_key_in_the_body(segment, tenant, path):
    message = {**TRACK, "type": "track"}
    body = {"batch": [message], "writeKey": tenant.key} if path == "/v1/batch" else {**message, "writeKey": tenant.key}

    ok(segment.post(path, body, auth=""))

    event = Event.objects.for_workspace(tenant.workspace).get()
    assert "writeKey" not in event.payload  # the key is never stored


@pytest.mark.parametrize(
    "header, code",
    [
        ("", "missing_api_key"),
        ("Basic", "invalid_api_key"),  # a bare word is taken for a (wrong) key
        ("Basic !!!not-base64", "missing_api_key"),
        ("Token abc def", "missing_api_key"),
        ("Bearer prv_live_" + "x" * 32, "invalid_api_key"),
        (basic("prv_live_" + "y" * 32), "invalid_api_key"),
        ("k" * 500, "invalid_api_key"),
    ],
)
def test_it_refuses_missing_and_unknown_keys(segment, tenant, header, code):
    before = counts(tenant)

    response = segment.post("/v1/track", TRACK, auth=header)

    assert response.status_code == 401
    assert response.json()["code"] == code and response.json()["message"]
    assert counts(tenant) == before


def test_it_refuses_an_unknown_write_key_in_the_body(segment, tenant):
    response = segment.post("/v1/track", {**TRACK, "writeKey": "prv_live_unknown"}, auth="")

    assert response.status_code == 401 and response.json()["code"] == "invalid_api_key"
    assert Event.objects.count() == 0


def test_a_revoked_key_stops_working_and_the_others_keep_working(segment, tenant):
    second = api_key_issue(workspace=tenant.workspace, name="second").raw_key
    ok(segment.post("/v1/track", TRACK))  # the key is now cached

    api_key_revoke(api_key=ApiKey.objects.get(workspace=tenant.workspace, name=""))

    response = segment.post("/v1/track", TRACK)
    assert response.status_code == 401 and response.json()["code"] == "invalid_api_key"
    ok(segment.post("/v1/track", TRACK, auth=f"Bearer {second}"))
    assert Event.objects.count() == 2


def test_a_key_revoked_by_another_process_stops_working_once_its_cache_entry_expires(
    segment, tenant, settings, monkeypatch
):
    from kana import services

    ok(segment.post("/v1/track", TRACK))  # the key is now cached in this process
    # Revoked by another process: this process's cache is not cleared, only its TTL ends it.
    ApiKey.objects.filter(workspace=tenant.workspace).update(revoked_at=timezone.now())
    ok(segment.post("/v1/track", TRACK))

    later = time.monotonic() + settings.KANA_API_KEY_CACHE_SECONDS
    monkeypatch.setattr(services, "time", SimpleNamespace(monotonic=lambda: later))
    response = segment.post("/v1/track", TRACK)
    assert response.status_code == 401 and response.json()["code"] == "invalid_api_key"
    assert Event.objects.count() == 2


def test_a_full_key_cache_still_answers_every_key_right(segment, tenant, monkeypatch):
    from kana import services

    monkeypatch.setattr(services, "_KEY_CACHE_MAX", 2)
    keys = [tenant.key, *(api_key_issue(workspace=tenant.workspace, name=f"k{i}").raw_key for i in range(3))]
    for _ in range(2):
        for key in keys:
            ok(segment.post("/v1/track", TRACK, auth=f"Bearer {key}"))
    assert len(services._key_cache) <= 2
    api_key_revoke(api_key=ApiKey.objects.get(workspace=tenant.workspace, name="k0"))
    response = segment.post("/v1/track", TRACK, auth=f"Bearer {keys[1]}")
    assert response.status_code == 401 and response.json()["code"] == "invalid_api_key"
    assert Event.objects.count() == 8


def test_the_key_is_checked_before_the_body_is_judged(segment, tenant):
    response = segment.post("/v1/track", b"{not json", auth="")

    assert response.status_code == 401 and response.json()["code"] == "missing_api_key"


@pytest.mark.parametrize("method", ["get", "put", "delete"])
def test_only_post_is_allowed(segment, method):
    response = getattr(segment.client, method)("/v1/track", HTTP_AUTHORIZATION=segment.tenant.basic())

    assert response.status_code == 405


# --- Signatures --------------------------------------------------------------------------


@pytest.fixture
def signed(tenant):
    tenant.workspace.signing_secret = "whsec-shared-secret"
    tenant.workspace.save()
    return tenant


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def test_a_signed_request_is_accepted(segment, signed):
    body = json.dumps({**TRACK, "type": "track"}).encode()

    ok(segment.post("/segment/events", body, HTTP_X_SIGNATURE=sign("whsec-shared-secret", body)))

    assert Event.objects.count() == 1


def test_the_signature_of_a_gzipped_body_is_over_the_json(segment, signed):
    body = json.dumps({"batch": [{**TRACK, "type": "track"}]}).encode()

    ok(
        segment.post(
            "/v1/batch",
            gzip.compress(body),
            HTTP_CONTENT_ENCODING="gzip",
            HTTP_X_SIGNATURE=sign("whsec-shared-secret", body).upper(),
        )
    )


@pytest.mark.parametrize("signature", [None, "", "0" * 40, "not-hex", "wrong-secret"])
def test_a_missing_or_bad_signature_is_refused(segment, signed, signature):
    body = json.dumps({**TRACK, "type": "track"}).encode()
    headers = {}
    if signature == "wrong-secret":
        headers["HTTP_X_SIGNATURE"] = sign("another-secret", body)
    elif signature is not None:
        headers["HTTP_X_SIGNATURE"] = signature
    before = counts(signed)

    response = segment.post("/segment/events", body, **headers)

    assert response.status_code == 401 and response.json()["code"] == "invalid_signature"
    assert counts(signed) == before


def test_a_signature_of_another_body_is_refused(segment, signed):
    body = json.dumps({**TRACK, "type": "track"}).encode()
    tampered = json.dumps({**TRACK, "type": "track", "event": "Tampered"}).encode()

    response = segment.post("/segment/events", tampered, HTTP_X_SIGNATURE=sign("whsec-shared-secret", body))

    assert response.status_code == 401
    assert Event.objects.count() == 0


def test_workspaces_without_a_secret_need_no_signature(segment, signed, other_tenant):
    ok(SegmentClient(other_tenant).post("/v1/track", TRACK))


# --- Tenancy ---------------------------------------------------------------------------------


def test_a_key_of_one_workspace_never_touches_another(segment, tenant, other_tenant):
    other = SegmentClient(other_tenant)
    ok(other.identify("1", {"name": "Other's user", "email": "other@example.com"}))
    other_bare = bare_user(other_tenant, "x@example.com")
    ok(other.track("1", "Report", messageId="m-1"))
    before = counts(other_tenant)
    before_user = user_for(other_tenant, "1")

    ok(segment.identify("1", {"name": "Acme's user", "email": "x@example.com"}))
    ok(segment.track("1", "Report", messageId="m-1"))
    ok(segment.post("/v1/alias", {"previousId": "1", "userId": "2"}))
    ok(segment.post("/v1/group", {"userId": "2", "groupId": "g"}))

    assert counts(other_tenant) == before
    after_user = user_for(other_tenant, "1")
    assert (after_user.pk, after_user.name, after_user.user_id) == (before_user.pk, "Other's user", "1")
    other_bare.refresh_from_db()
    assert other_bare.user_id is None  # not claimed from the other workspace
    mine = user_for(tenant, "2")
    assert mine.pk != before_user.pk and mine.workspace_id == tenant.workspace.pk
    assert mine.name == "Acme's user" and mine.email == "x@example.com"
    assert "same_email" not in flags(mine)  # the other workspace's x@ does not count
    assert Event.objects.for_workspace(tenant.workspace).filter(message_id="m-1").get().user_id == mine.pk
