"""Segment's own Python library talks to Kana unchanged (SPEC §3).

``segment-analytics-python`` posts ``{"batch": [...], "sentAt", "writeKey"}`` to
``host + "/v1/batch"`` with ``Authorization: Basic base64("<writeKey>:")``; a live test
server stands in for api.segment.io.
"""

import pytest
from segment.analytics import Client
from segment.analytics import request as segment_request
from segment.analytics.request import APIError

from features.models import Event, EventStatus, Usage
from features.services import feature_create
from users.models import Group, GroupMembership, MergeReason, MergeRecord

from .identity_support import all_users, bare_user, identities_of, user_for


@pytest.fixture(autouse=True)
def _hang_up(live_server):
    yield
    # The library keeps its HTTP connection alive in a module-level session; the server thread
    # serving it would hold its database connection until the socket closes.
    segment_request._session.close()


@pytest.fixture
def analytics(live_server, tenant):
    # sync_mode: each call is posted before it returns (no consumer thread, so no shutdown).
    return Client(write_key=tenant.key, host=live_server.url, sync_mode=True, max_retries=0)


def test_the_library_delivers_identify_alias_group_and_track(analytics, tenant):
    feature_create(workspace=tenant.workspace, key="reports")
    bare = bare_user(tenant, "ann@example.com", billing_id="cus_Stripe1")

    analytics.identify("anon-7", {"name": "Visitor"})
    analytics.identify("user-1", {"email": "ann@example.com", "name": "Ann"})
    analytics.alias("anon-7", "user-1")
    analytics.group("user-1", "acme", {"name": "Acme", "plan": "pro"})
    analytics.track("anon-7", "Report Exported", {"featureId": "reports", "delta": 2})

    [user] = all_users(tenant)
    # user-1 claimed the Stripe import (case 8); the alias merged anon-7 in, oldest survives.
    assert user.pk == bare.pk
    assert (user.user_id, user.name, user.email, user.billing_id) == ("user-1", "Ann", "ann@example.com", "cus_Stripe1")
    assert identities_of(user) == {"anon-7", "user-1"}
    assert MergeRecord.objects.get().reason == MergeReason.ALIAS
    assert Group.objects.get(group_id="acme").traits == {"name": "Acme", "plan": "pro"}
    assert GroupMembership.objects.get().user_id == user.pk
    track = Event.objects.get(type="track")
    assert (track.user_id, track.status, track.external_user_id) == (user.pk, EventStatus.MAPPED, "anon-7")
    assert Usage.objects.get().amount == 2
    assert track.payload["context"]["library"]["name"] == "analytics-python"
    assert "writeKey" not in track.payload
    assert Event.objects.count() == 5


def test_the_library_delivers_gzipped_batches_from_its_queue(live_server, tenant):
    client = Client(write_key=tenant.key, host=live_server.url, gzip=True, upload_size=50, max_retries=0)
    try:
        for i in range(30):
            client.track(f"user-{i % 3}", "Page Exported", {"page": i})
        client.identify("user-0", {"email": "zero@example.com"})
        client.flush()
    finally:
        client.shutdown()

    assert Event.objects.filter(type="track").count() == 30
    assert len(all_users(tenant)) == 3
    assert user_for(tenant, "user-0").email == "zero@example.com"


def test_the_library_reads_kanas_errors(live_server, tenant):
    client = Client(write_key="prv_live_" + "0" * 32, host=live_server.url, sync_mode=True, max_retries=0)

    with pytest.raises(APIError) as raised:
        client.track("user-1", "Report")

    assert (raised.value.status, raised.value.code) == (401, "invalid_api_key")
    assert Event.objects.count() == 0


def test_the_library_message_ids_make_its_retries_harmless(analytics, tenant):
    analytics.track("user-1", "Report", message_id="library-retry-1")
    analytics.track("user-1", "Report", message_id="library-retry-1")

    assert Event.objects.filter(message_id="library-retry-1").count() == 1
