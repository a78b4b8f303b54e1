"""Track, page and screen calls recording feature usage (SPEC §5)."""

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings
from django.db import connections

from features.models import Event, EventStatus, Usage
from features.selectors import event_list, usage_totals
from tests.conftest import SegmentClient, requires_postgres
from tests.usage_support import T0, make_feature, make_rule, usage_count, usage_total
from users.models import EndUser

pytestmark = pytest.mark.usefixtures("tasks_in_process")


def _event(tenant, message_id: str) -> Event:
    return Event.objects.get(workspace=tenant.workspace, message_id=message_id)


def test_it_maps_a_feature_id_with_the_default_delta(segment, tenant):
    make_feature(tenant.workspace, "messages")
    response = segment.track("u1", "Message Sent", {"featureId": "messages"}, messageId="m1")
    assert response.status_code == 200
    assert response.json() == {"success": True, "message_id": "m1", "status": "mapped"}
    usage = Usage.objects.get(event=_event(tenant, "m1"))
    assert usage.feature.key == "messages" and usage.amount == 1 and usage.rule is None
    assert usage.user == EndUser.objects.get(workspace=tenant.workspace, user_id="u1")


@pytest.mark.parametrize(
    ("delta", "expected"),
    [(5, Decimal(5)), (2.5, Decimal("2.5")), ("3", Decimal(3)), (-2, Decimal(-2)), (0, Decimal(0))],
)
def test_it_records_the_delta_sent(segment, tenant, delta, expected):
    make_feature(tenant.workspace, "credits")
    response = segment.track("u1", "Credits Used", {"featureId": "credits", "delta": delta})
    assert response.json()["status"] == "mapped"
    assert usage_total(tenant.workspace, "credits") == expected


def test_a_negative_delta_undoes_usage(segment, tenant):
    make_feature(tenant.workspace, "seats")
    segment.track("u1", "Seat Added", {"featureId": "seats", "delta": 3})
    segment.track("u1", "Seat Removed", {"featureId": "seats", "delta": -1})
    assert usage_totals(tenant.workspace, feature_key="seats")[0]["total"] == Decimal(2)


@pytest.mark.parametrize("delta", ["lots", True, None, {"n": 1}, [1], "NaN", "Infinity", "1e400"])
def test_a_non_numeric_delta_leaves_the_event_unmapped_and_visible(segment, tenant, delta):
    make_feature(tenant.workspace, "credits")
    response = segment.track("u1", "Credits Used", {"featureId": "credits", "delta": delta}, messageId="bad")
    assert response.status_code == 200
    assert response.json()["status"] == "unmapped" and response.json()["reason"] == "invalid_delta"
    listed = list(event_list(tenant.workspace, status=EventStatus.UNMAPPED))
    assert [(e.message_id, e.unmapped_reason) for e in listed] == [("bad", "invalid_delta")]
    assert usage_count(tenant.workspace, "credits") == 0


def test_an_unknown_feature_id_is_mapped_with_its_original_time_once_the_feature_exists(
    segment, tenant, django_capture_on_commit_callbacks
):
    when = T0 - timedelta(days=30)
    response = segment.track("u1", "Export", {"featureId": "exports", "delta": 4}, timestamp=when.isoformat())
    assert response.json()["status"] == "unmapped" and response.json()["reason"] == "unknown_feature"
    segment.track("u1", "Export", {"featureId": "other"})  # names another feature: stays unmapped

    with django_capture_on_commit_callbacks(execute=True):
        make_feature(tenant.workspace, "exports")

    mapped = Event.objects.get(workspace=tenant.workspace, status=EventStatus.MAPPED)
    usage = Usage.objects.get(event=mapped)
    assert usage.feature.key == "exports" and usage.amount == 4 and usage.occurred_at == when
    other = Event.objects.get(workspace=tenant.workspace, status=EventStatus.UNMAPPED)
    assert other.unmapped_reason == "unknown_feature"
    # Later events with that featureId are mapped at ingest.
    assert segment.track("u1", "Export", {"featureId": "exports"}).json()["status"] == "mapped"
    assert usage_total(tenant.workspace, "exports") == 5


def test_a_new_feature_with_an_invalid_delta_event_shows_the_new_reason(
    segment, tenant, django_capture_on_commit_callbacks
):
    segment.track("u1", "Export", {"featureId": "exports", "delta": "many"}, messageId="e1")
    assert _event(tenant, "e1").unmapped_reason == "unknown_feature"
    with django_capture_on_commit_callbacks(execute=True):
        make_feature(tenant.workspace, "exports")
    event = _event(tenant, "e1")
    assert (event.status, event.unmapped_reason) == ("unmapped", "invalid_delta")


def test_page_and_screen_calls_are_stored_as_viewed_events_that_rules_can_map(
    segment, tenant, django_capture_on_commit_callbacks
):
    segment.post("/v1/page", {"userId": "u1", "name": "Pricing", "messageId": "p1"})
    segment.post("/v1/screen", {"userId": "u1", "name": "Settings", "messageId": "s1"})
    segment.post("/segment/events", {"type": "page", "userId": "u1", "properties": {"name": "Docs"}})
    assert _event(tenant, "p1").name == "Viewed Pricing Page"
    assert _event(tenant, "s1").name == "Viewed Settings Screen"
    assert Event.objects.filter(workspace=tenant.workspace, name="Viewed Docs Page").count() == 1

    make_feature(tenant.workspace, "pricing-views")
    with django_capture_on_commit_callbacks(execute=True):
        make_rule(tenant.workspace, "pricing-views", event="Viewed Pricing Page")
    assert _event(tenant, "p1").status == EventStatus.MAPPED
    assert _event(tenant, "s1").status == EventStatus.UNMAPPED
    response = segment.post("/v1/page", {"userId": "u2", "name": "Pricing"})
    assert response.json()["status"] == "mapped"
    assert usage_count(tenant.workspace, "pricing-views") == 2


@pytest.mark.parametrize("user_id", [None, "", "anonymous", "null", "0"])
def test_an_anonymous_track_is_refused_and_not_stored(segment, tenant, user_id):
    make_feature(tenant.workspace, "messages")
    body = {"event": "Message Sent", "anonymousId": "anon-1", "properties": {"featureId": "messages"}}
    if user_id is not None:
        body["userId"] = user_id
    response = segment.post("/v1/track", body)
    assert response.status_code == 400
    assert response.json()["code"] == "anonymous_event" and response.json()["field"] == "userId"
    assert not Event.objects.filter(workspace=tenant.workspace).exists()


def test_a_track_without_an_event_name_is_refused(segment, tenant):
    response = segment.post("/v1/track", {"userId": "u1", "properties": {}})
    assert response.status_code == 400 and response.json()["code"] == "missing_event"
    assert not Event.objects.filter(workspace=tenant.workspace).exists()


def test_a_replayed_message_counts_once(segment, tenant):
    make_feature(tenant.workspace, "messages")
    for _ in range(3):
        response = segment.track("u1", "Message Sent", {"featureId": "messages"}, messageId="same")
        assert response.status_code == 200
    batch = segment.batch([{"type": "track", "userId": "u1", "event": "x", "messageId": "same"}] * 2)
    assert batch.json()["duplicates"] == 2
    assert usage_total(tenant.workspace, "messages") == 1


def test_usage_totals_per_user_and_feature_all_time_and_for_a_range(segment, tenant):
    make_feature(tenant.workspace, "messages")
    make_feature(tenant.workspace, "exports")
    day = timedelta(days=1)
    sent = [
        ("alice", "messages", 2, T0),
        ("alice", "messages", 3, T0 + day),
        ("alice", "exports", 1, T0 + 2 * day),
        ("bob", "messages", 10, T0 + 3 * day),
        ("bob", "messages", -4, T0 + 4 * day),
    ]
    for user_id, feature, delta, when in sent:
        properties = {"featureId": feature, "delta": delta}
        assert segment.track(user_id, "Used", properties, timestamp=when.isoformat()).status_code == 200
    alice = EndUser.objects.get(workspace=tenant.workspace, user_id="alice").pk
    bob = EndUser.objects.get(workspace=tenant.workspace, user_id="bob").pk

    totals = {(r["user_pk"], r["feature"]): r["total"] for r in usage_totals(tenant.workspace)}
    assert totals == {(alice, "exports"): 1, (alice, "messages"): 5, (bob, "messages"): 6}
    # start inclusive, end exclusive, on the events' original times
    ranged = usage_totals(tenant.workspace, start=T0 + day, end=T0 + 4 * day)
    assert {(r["user_pk"], r["feature"]): r["total"] for r in ranged} == {
        (alice, "messages"): 3,
        (alice, "exports"): 1,
        (bob, "messages"): 10,
    }
    assert usage_totals(tenant.workspace, user_pk=bob, feature_key="messages", start=T0 + 4 * day) == [
        {"user_pk": bob, "feature": "messages", "total": Decimal(-4)}
    ]


def test_another_workspace_sees_none_of_it(segment, tenant, other_tenant):
    make_feature(tenant.workspace, "messages")
    segment.track("u1", "Message Sent", {"featureId": "messages"})
    other = SegmentClient(other_tenant)
    response = other.track("u1", "Message Sent", {"featureId": "messages"})
    assert response.json()["reason"] == "unknown_feature"  # the feature is the first workspace's
    assert usage_totals(other_tenant.workspace) == []
    assert len(usage_totals(tenant.workspace)) == 1


@pytest.mark.skipif(
    "sqlite" in settings.DATABASES["default"]["ENGINE"],
    reason="SQLite splits bulk inserts every 999 parameters; the bound is PostgreSQL's",
)
def test_ingest_runs_a_fixed_number_of_queries_whatever_the_batch_size(
    segment, tenant, django_assert_max_num_queries, django_capture_on_commit_callbacks
):
    make_feature(tenant.workspace, "messages")
    with django_capture_on_commit_callbacks(execute=True):
        make_rule(
            tenant.workspace,
            "messages",
            event="Message Sent",
            conditions=[{"property": "plan.tier", "operator": "equals", "value": "pro"}],
        )

    def batch(size: int, prefix: str):
        return [
            {
                "type": "track",
                "userId": f"{prefix}-user-{i % 7}",
                "event": "Message Sent",
                "messageId": f"{prefix}-{i}",
                "properties": {"plan": {"tier": "pro" if i % 2 else "free"}, "featureId": None},
            }
            for i in range(size)
        ]

    segment.batch(batch(2, "warm"))  # rules cache warm
    with django_assert_max_num_queries(12):
        assert segment.batch(batch(10, "small")).json()["accepted"] == 10
    with django_assert_max_num_queries(12):
        assert segment.batch(batch(500, "large")).json()["accepted"] == 500
    assert usage_count(tenant.workspace, "messages") == 1 + 5 + 250


@requires_postgres
def test_concurrent_copies_of_one_message_count_once(transactional_db, tenant, tasks_in_process):
    make_feature(tenant.workspace, "messages")
    barrier = threading.Barrier(6)
    answers = []

    def send():
        try:
            client = SegmentClient(tenant)
            barrier.wait(timeout=10)
            response = client.track("racer", "Message Sent", {"featureId": "messages"}, messageId="once")
            answers.append((response.status_code, response.json()["status"]))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(answers) == [(200, "duplicate")] * 5 + [(200, "mapped")]
    assert Event.objects.filter(workspace=tenant.workspace, message_id="once").count() == 1
    assert usage_count(tenant.workspace, "messages") == 1
    assert EndUser.objects.filter(workspace=tenant.workspace, user_id="racer").count() == 1


@requires_postgres
def test_a_track_waiting_for_a_feature_s_creation_is_mapped_to_it(transactional_db, tenant, tasks_in_process):
    """The rules version is read after the shared rules lock is granted (since round 8 by the
    replay read's own statement): a track that waited for a feature's creation sees it."""
    from django.db import connection, transaction

    from features.services import feature_create

    locked, release, answers = threading.Event(), threading.Event(), []

    def create():
        try:
            with transaction.atomic():
                feature = feature_create(workspace=tenant.workspace, key="late")  # takes the lock exclusively
                locked.set()
                release.wait(timeout=20)
            assert feature.pk
        finally:
            connections.close_all()

    def send():
        try:
            response = SegmentClient(tenant).track("waiter", "Report Exported", {"featureId": "late"})
            answers.append(response.json()["status"])
        finally:
            connections.close_all()

    SegmentClient(tenant).track("waiter", "Warm Up")  # the user exists; statements prepared
    creator = threading.Thread(target=create)
    creator.start()
    assert locked.wait(timeout=20)
    sender = threading.Thread(target=send)
    sender.start()
    with connection.cursor() as cursor:
        for _ in range(200):  # until the track waits for the rules lock
            cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            if cursor.fetchone()[0]:
                break
            sender.join(timeout=0.05)
        else:
            raise AssertionError("the track never waited for the rules lock")
    release.set()
    creator.join(timeout=30)
    sender.join(timeout=30)
    assert answers == ["mapped"]
    assert usage_count(tenant.workspace, "late") == 1
