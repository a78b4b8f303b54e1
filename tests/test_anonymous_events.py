"""Held anonymous events (SPEC §12): with ``anonymous_events = hold`` a track/page/screen with
only an anonymousId is stored as pending; an identify (both ids) or an alias (previousId)
moves its pending events to the user and maps them; the rest expire after the hold window."""

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connections
from django.db.models import Sum
from django.utils import timezone

from features.models import Event, EventStatus, Usage
from features.tasks import expire_pending_anonymous_events
from kana.models import Workspace
from kana.services import workspace_settings_update
from users.models import EndUser

from .api_support import ApiClient, rule
from .conftest import SegmentClient, requires_postgres

# Every test here sends Segment messages: run each on both ingest routes (conftest).
pytestmark = pytest.mark.usefixtures("ingest_route")

T1 = "2025-01-03T10:00:00Z"


@pytest.fixture
def holding(tenant, exports_and_seats):
    workspace_settings_update(workspace=tenant.workspace, changes={"anonymous_events": "hold"})
    tenant.workspace.refresh_from_db()
    rule(tenant, "seats", "Seat Added")
    return tenant


def anonymous_track(segment, anonymous_id, event, properties=None, **fields):
    body = {"anonymousId": anonymous_id, "event": event, "properties": properties or {}, **fields}
    return segment.post("/v1/track", body)


def _events(tenant, **filters):
    return Event.objects.for_workspace(tenant.workspace).filter(**filters)


def test_reject_is_the_default_and_answers_anonymous_event(tenant, segment):
    response = anonymous_track(segment, "anon-1", "Exported")
    assert response.status_code == 400 and response.json()["code"] == "anonymous_event"
    assert not _events(tenant).exists()


def test_reject_again_after_hold_refuses_anonymous_events(holding, segment):
    workspace_settings_update(workspace=holding.workspace, changes={"anonymous_events": "reject"})
    response = anonymous_track(segment, "anon-1", "Exported")
    assert response.status_code == 400 and response.json()["code"] == "anonymous_event"


def test_hold_stores_anonymous_usage_calls_as_pending(holding, segment):
    assert anonymous_track(segment, "anon-1", "Exported", {"featureId": "exports"}).json()["status"] == "pending"
    page = segment.post("/v1/page", {"anonymousId": "anon-1", "name": "Pricing"})
    screen = segment.post("/v1/screen", {"anonymousId": "anon-1", "name": "Home"})
    assert (page.json()["status"], screen.json()["status"]) == ("pending", "pending")
    pending = _events(holding, status=EventStatus.PENDING)
    assert pending.count() == 3
    assert set(pending.values_list("user_id", "external_user_id")) == {(None, "anon-1")}
    assert not Usage.objects.exists() and not EndUser.objects.exists()
    # No anonymousId either: still refused.
    response = segment.post("/v1/track", {"event": "Exported"})
    assert response.status_code == 400 and response.json()["code"] == "anonymous_event"
    assert ApiClient(holding).get("workspace").json()["anonymous_pending"] == 3


def test_an_identify_with_both_ids_moves_and_maps_the_pending_events(holding, segment):
    anonymous_track(segment, "anon-1", "Exported", {"featureId": "exports", "delta": 4}, timestamp=T1)
    anonymous_track(segment, "anon-1", "Seat Added", timestamp=T1)
    anonymous_track(segment, "anon-1", "Nothing Maps This", timestamp=T1)
    anonymous_track(segment, "anon-2", "Exported", {"featureId": "exports"})
    response = segment.identify("ada", {"email": "ada@example.com"}, anonymousId="anon-1")
    assert response.json()["status"] == "processed"

    ada = EndUser.objects.get(user_id="ada")
    moved = _events(holding, user=ada).exclude(type="identify")
    assert sorted(moved.values_list("status", "unmapped_reason")) == [
        ("mapped", ""),
        ("mapped", ""),
        ("unmapped", "no_matching_rule"),
    ]
    assert set(moved.values_list("external_user_id", flat=True)) == {"ada"}
    usage = Usage.objects.filter(user=ada)
    assert {(u.feature.key, u.amount) for u in usage} == {("exports", 4), ("seats", 1)}
    assert {u.occurred_at for u in usage} == {datetime(2025, 1, 3, 10, tzinfo=UTC)}  # their original time
    assert _events(holding, status=EventStatus.PENDING).count() == 1  # anon-2 waits
    # A replayed identify, or another one, changes nothing.
    segment.identify("ada", {}, anonymousId="anon-1")
    assert Usage.objects.filter(user=ada).aggregate(total=Sum("amount"))["total"] == 5


def test_an_alias_whose_previous_id_is_held_moves_its_events(holding, segment):
    anonymous_track(segment, "anon-9", "Exported", {"featureId": "exports"}, messageId="a-1")
    assert segment.post("/v1/alias", {"previousId": "anon-9", "userId": "bob"}).json()["status"] == "processed"
    bob = EndUser.objects.get(user_id="bob")
    assert _events(holding, message_id="a-1", user=bob, status=EventStatus.MAPPED).exists()
    assert Usage.objects.filter(user=bob).count() == 1
    # The anonymous track replayed: a duplicate, nothing new.
    assert anonymous_track(segment, "anon-9", "Exported", messageId="a-1").json()["status"] == "duplicate"
    assert Usage.objects.count() == 1


def test_a_batch_lists_its_pending_messages(holding, segment):
    batch = [{"type": "track", "userId": "u1", "event": "Exported", "messageId": "known"}]
    batch += [
        {"type": "track", "anonymousId": "anon-b", "event": "Seat Added", "messageId": f"p-{n}"} for n in range(12)
    ]
    answer = segment.batch(batch).json()
    assert answer["accepted"] == 13 and answer["rejected"] == []
    assert [p["index"] for p in answer["pending"]] == list(range(1, 13))
    assert _events(holding, status=EventStatus.PENDING).count() == 12  # the COPY path too
    segment.batch([{"type": "identify", "userId": "u2", "anonymousId": "anon-b", "messageId": "link"}])
    assert Usage.objects.filter(user__user_id="u2", feature__key="seats").count() == 12


def test_pending_events_past_the_hold_window_expire_and_are_counted(holding, segment, other_tenant):
    workspace_settings_update(workspace=holding.workspace, changes={"anonymous_hold_days": 2})
    for n, days_ago in enumerate((3, 3, 1)):
        anonymous_track(segment, "anon-old", "Exported", {"featureId": "exports"}, messageId=f"e-{n}")
        _events(holding, message_id=f"e-{n}").update(received_at=timezone.now() - timedelta(days=days_ago))
    # Another workspace's old pending event expires by its own window (30 days): not yet.
    Workspace.objects.filter(pk=other_tenant.workspace.pk).update(anonymous_events="hold")
    anonymous_track(SegmentClient(other_tenant), "anon-old", "Exported", messageId="theirs")
    _events(other_tenant, message_id="theirs").update(received_at=timezone.now() - timedelta(days=3))

    assert expire_pending_anonymous_events() == 2
    assert expire_pending_anonymous_events() == 0
    assert sorted(_events(holding).values_list("message_id", "status")) == [
        ("e-0", "expired"),
        ("e-1", "expired"),
        ("e-2", "pending"),
    ]
    body = ApiClient(holding).get("workspace").json()
    assert (body["anonymous_pending"], body["anonymous_expired"]) == (1, 2)
    # An identify after the window moves only what is still pending.
    segment.identify("late", {}, anonymousId="anon-old")
    assert Usage.objects.filter(user__user_id="late").count() == 1
    assert _events(holding, status=EventStatus.EXPIRED).count() == 2


@requires_postgres
def test_concurrent_identifies_of_one_anonymous_id_map_its_events_once(transactional_db, tenant):
    from features.services import feature_create

    feature_create(workspace=tenant.workspace, key="exports")
    workspace_settings_update(workspace=tenant.workspace, changes={"anonymous_events": "hold"})
    segment = SegmentClient(tenant)
    batch = [
        {"type": "track", "anonymousId": "anon-c", "event": "E", "properties": {"featureId": "exports"}}
        for _ in range(20)
    ]
    assert len(segment.batch(batch).json()["pending"]) == 20
    barrier = threading.Barrier(6)
    statuses = []

    def identify(user_id):
        try:
            client = SegmentClient(tenant)
            barrier.wait(timeout=30)
            statuses.append(client.identify(user_id, {}, anonymousId="anon-c").status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=identify, args=(f"racer-{n % 3}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [200] * 6
    assert not Event.objects.filter(status=EventStatus.PENDING).exists()
    assert Usage.objects.count() == 20
    owners = set(Event.objects.filter(type="track").values_list("user_id", flat=True))
    assert len(owners) == 1 and set(Usage.objects.values_list("user_id", flat=True)) == owners


def test_a_held_event_arriving_after_its_link_goes_to_the_user_at_once(holding, segment):
    """Segment does not keep order: a track sent before the identify may arrive after it."""
    segment.identify("ada", {}, anonymousId="anon-1")
    response = anonymous_track(segment, "anon-1", "Seat Added", timestamp=T1, messageId="late")
    assert response.json()["status"] == "mapped"
    ada = EndUser.objects.get(user_id="ada")
    late = _events(holding).get(message_id="late")
    assert (late.user_id, late.external_user_id, late.status) == (ada.pk, "ada", "mapped")
    assert Usage.objects.get(event=late).user_id == ada.pk
    # The first link wins; the links of a deleted user go with it (its userId is suppressed).
    segment.identify("bob", {}, anonymousId="anon-1")
    assert anonymous_track(segment, "anon-1", "Seat Added").json()["status"] == "mapped"
    assert Usage.objects.filter(user=ada).count() == 2
    assert ApiClient(holding).delete(f"users/{ada.pk}").status_code == 204
    assert anonymous_track(segment, "anon-1", "Seat Added").json()["status"] == "pending"


def test_links_are_kept_only_by_a_workspace_that_holds_anonymous_events(tenant, segment):
    segment.identify("ada", {}, anonymousId="anon-1")
    workspace_settings_update(workspace=tenant.workspace, changes={"anonymous_events": "hold"})
    assert anonymous_track(segment, "anon-1", "Exported").json()["status"] == "pending"


@requires_postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("as_batch", [False, True], ids=["single", "batch"])
def test_a_held_event_linked_to_an_alias_goes_to_the_alias_user(holding, segment, as_batch):
    """Outside a transaction (production), usage ingest reads the sent userIds' users with its
    first statement; a linked userId was not sent, so it must be looked up, not created: an
    alias's userId is another identity of its user, and creating a user for it failed."""
    segment.identify("ada", {})
    assert segment.post("/v1/alias", {"userId": "ada", "previousId": "ada-old"}).status_code == 200
    segment.identify("ada-old", {}, anonymousId="anon-2")
    track = {"type": "track", "anonymousId": "anon-2", "event": "Seat Added", "messageId": "linked"}
    response = segment.batch([track]) if as_batch else segment.post("/v1/track", track)
    assert response.status_code == 200, response.content
    ada = EndUser.objects.get(user_id="ada")
    linked = _events(holding).get(message_id="linked")
    assert (linked.user_id, linked.external_user_id, linked.status) == (ada.pk, "ada-old", "mapped")
    assert Usage.objects.get(event=linked).user_id == ada.pk
