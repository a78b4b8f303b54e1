"""POST /api/v1/events/{id}/void: a correction that removes an event's usage for good."""

from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction

from features.corrections import CorrectionError, event_void
from features.models import Event, EventStatus, ReprocessingJob, Usage
from features.reprocessing import process_chunk
from features.selectors import usage_totals
from kana.models import AuditEntry

from .api_support import ApiClient, assert_error, feature, identify, rule, track


def _event(tenant, name: str, **filters) -> Event:
    return Event.objects.for_workspace(tenant.workspace).filter(name=name, **filters).order_by("pk").last()


def _totals(tenant) -> dict:
    return {row["feature"]: row["total"] for row in usage_totals(tenant.workspace)}


def _run_jobs(tenant) -> None:
    for job in ReprocessingJob.objects.filter(workspace=tenant.workspace).order_by("pk"):
        while not process_chunk(job.pk).finished:
            pass


def test_it_voids_a_mapped_event_and_its_usage(tenant):
    feature(tenant, "seats")
    rule(tenant, "seats", "Seat Added", amount_property="seats")
    track(tenant, "u1", "Seat Added", seats=3)
    track(tenant, "u1", "Seat Added", seats=4)
    assert _totals(tenant) == {"seats": Decimal(7)}
    event = _event(tenant, "Seat Added", payload__properties__seats=4)
    api = ApiClient(tenant)

    response = api.post(f"events/{event.pk}/void", {"reason": "sent twice"})

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["void_reason"], body["unmapped_reason"]) == ("voided", "sent twice", "")
    assert body["voided_at"]
    assert not Usage.objects.filter(event=event).exists()
    assert _totals(tenant) == {"seats": Decimal(3)}
    assert api.get(f"events/{event.pk}").json() == body
    assert [e["id"] for e in api.get("events", {"status": "voided"}).json()["results"]] == [event.pk]


def test_it_is_idempotent(tenant):
    track(tenant, "u1", "Clicked")
    event = _event(tenant, "Clicked")
    api = ApiClient(tenant)
    first = api.post(f"events/{event.pk}/void", {"reason": "test traffic"}).json()

    again = api.post(f"events/{event.pk}/void", {"reason": "another reason"})

    assert again.status_code == 200 and again.json() == first, "the first void's reason and time stand"
    assert AuditEntry.objects.filter(action="event.void", object_id=str(event.pk)).count() == 1


def test_reprocessing_never_maps_a_voided_event(tenant):
    track(tenant, "u1", "Exported")
    track(tenant, "u1", "Exported")
    track(tenant, "u1", "Used", featureId="seats")
    voided_export = _event(tenant, "Exported")
    voided_use = _event(tenant, "Used")
    event_void(workspace=tenant.workspace, event_id=voided_export.pk, reason="bot")
    event_void(workspace=tenant.workspace, event_id=voided_use.pk, reason="bot")

    feature(tenant, "exports")
    rule(tenant, "exports", "Exported")
    feature(tenant, "seats")  # a new feature reprocesses events that named it
    _run_jobs(tenant)

    assert _totals(tenant) == {"exports": Decimal(1)}, "only the event that was not voided"
    for event in (voided_export, voided_use):
        event.refresh_from_db()
        assert event.status == EventStatus.VOIDED and not Usage.objects.filter(event=event).exists()


def test_a_voided_event_cannot_be_set_back_to_unmapped(tenant):
    track(tenant, "u1", "Clicked")
    event = _event(tenant, "Clicked")
    event_void(workspace=tenant.workspace, event_id=event.pk, reason="bot")

    with pytest.raises(IntegrityError), transaction.atomic():
        Event.objects.filter(pk=event.pk).update(status=EventStatus.UNMAPPED)


def test_replaying_a_voided_message_changes_nothing(tenant, segment):
    feature(tenant, "exports")
    rule(tenant, "exports", "Exported")
    body = {"userId": "u1", "event": "Exported", "messageId": "m-1", "timestamp": "2025-01-10T12:00:00Z"}
    assert segment.post("/v1/track", body).status_code == 200
    event = _event(tenant, "Exported")
    event_void(workspace=tenant.workspace, event_id=event.pk, reason="bot")

    assert segment.post("/v1/track", body).status_code == 200

    event.refresh_from_db()
    assert event.status == EventStatus.VOIDED and _totals(tenant) == {}


def test_processed_events_are_not_voidable(tenant):
    identify(tenant, "u1", email="ada@example.com")
    event = Event.objects.for_workspace(tenant.workspace).get(type="identify")

    assert_error(ApiClient(tenant).post(f"events/{event.pk}/void", {"reason": "x"}), 409, "not_voidable")

    event.refresh_from_db()
    assert event.status == EventStatus.PROCESSED and event.voided_at is None
    assert not AuditEntry.objects.filter(action="event.void").exists()


def test_it_needs_a_reason(tenant):
    track(tenant, "u1", "Clicked")
    event = _event(tenant, "Clicked")
    api = ApiClient(tenant)

    assert_error(api.post(f"events/{event.pk}/void", {}), 400, "invalid_request", "reason")
    assert_error(api.post(f"events/{event.pk}/void", {"reason": "  "}), 400, "invalid_request", "reason")
    with pytest.raises(CorrectionError):
        event_void(workspace=tenant.workspace, event_id=event.pk, reason="")
    event.refresh_from_db()
    assert event.status == EventStatus.UNMAPPED


def test_another_workspaces_event_is_not_found(tenant, other_tenant):
    track(other_tenant, "u1", "Clicked")
    theirs = _event(other_tenant, "Clicked")

    assert_error(ApiClient(tenant).post(f"events/{theirs.pk}/void", {"reason": "x"}), 404, "not_found")

    theirs.refresh_from_db()
    assert theirs.status == EventStatus.UNMAPPED
    with pytest.raises(CorrectionError) as refused:
        event_void(workspace=tenant.workspace, event_id=theirs.pk, reason="x")
    assert refused.value.status == 404


def test_the_dashboard_voids_from_the_user_page(tenant, member_client):
    feature(tenant, "exports")
    rule(tenant, "exports", "Exported")
    track(tenant, "u1", "Exported")
    event = _event(tenant, "Exported")
    user_pk = event.user_id
    page = member_client.get(f"/users/{user_pk}/")
    assert b'name="reason"' in page.content and b">Void</button>" in page.content

    response = member_client.post(f"/users/{user_pk}/events/{event.pk}/void/", {"reason": "typo"})

    assert response.status_code == 302
    event.refresh_from_db()
    assert (event.status, event.void_reason) == (EventStatus.VOIDED, "typo")
    assert _totals(tenant) == {}
    entry = AuditEntry.objects.get(action="event.void")
    assert entry.actor.startswith("user:")
    page = member_client.get(f"/users/{user_pk}/")
    assert b"voided" in page.content and b"typo" in page.content
