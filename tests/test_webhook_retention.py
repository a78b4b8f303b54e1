"""Webhook history is pruned past its retention (``webhooks.retention``), never a delivery
that is still being retried. The rows are made by real notifications delivered to a real
receiver, then aged in the database: the clock itself is not mocked."""

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.db import transaction
from django.utils import timezone

from kana.signals import notification
from webhooks import retention, tasks
from webhooks.models import DeliveryAttempt, DeliveryStatus, WebhookDelivery, WebhookEvent

from .api_support import ApiClient, assert_page
from .webhook_support import Receiver, Reply, create_endpoint


@pytest.fixture(autouse=True)
def loopback_receivers(settings):
    settings.KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True
    settings.KANA_WEBHOOK_HISTORY_DAYS = 30


@pytest.fixture
def api(tenant) -> ApiClient:
    return ApiClient(tenant)


@pytest.fixture
def notify(tenant, tasks_in_process, django_capture_on_commit_callbacks):
    def send(event_key: str):
        with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
            notification.send(
                None,
                workspace_id=tenant.workspace.pk,
                event_type="usage.limit_reached",
                data={"user_id": "u1", "feature": "exports"},
                event_key=event_key,
            )
        return WebhookEvent.objects.get(event_key=event_key)

    return send


def age(event: WebhookEvent, days: float) -> None:
    WebhookEvent.objects.filter(pk=event.pk).update(created_at=timezone.now() - timedelta(days=days))


def test_old_history_goes_with_its_deliveries_and_attempts_and_the_rest_stays(api, notify):
    with Receiver(Reply(200, "ok"), Reply(500, "boom")) as receiver:
        endpoint = create_endpoint(api, receiver.url, ["usage.limit_reached"])
        delivered = notify("old-delivered")
        still_retried = notify("old-but-pending")
        recent = notify("recent")
    WebhookDelivery.objects.filter(event=still_retried).update(status=DeliveryStatus.PENDING)
    WebhookDelivery.objects.filter(event=recent).update(status=DeliveryStatus.FAILED, next_attempt_at=None)
    for event in (delivered, still_retried):
        age(event, days=31)
    age(recent, days=29)
    assert DeliveryAttempt.objects.filter(delivery__event=delivered).exists()

    assert retention.prune_history(time_budget_seconds=30) == 1

    assert set(WebhookEvent.objects.values_list("event_key", flat=True)) == {"old-but-pending", "recent"}
    assert not WebhookDelivery.objects.filter(event_id=delivered.pk).exists()
    assert not DeliveryAttempt.objects.filter(delivery__event_id=delivered.pk).exists()
    assert DeliveryAttempt.objects.filter(delivery__event=recent).exists(), "a younger event keeps its attempts"
    listed = assert_page(api.get(f"webhooks/{endpoint['id']}/deliveries").json())
    assert {row["event"]["id"] for row in listed} == {still_retried.pk, recent.pk}
    assert retention.prune_history(time_budget_seconds=30) == 0, "a second run finds nothing more"


def test_pruning_works_through_batches_and_a_zero_retention_keeps_everything(api, notify, settings):
    with Receiver() as receiver:
        create_endpoint(api, receiver.url, ["usage.limit_reached"])
        events = [notify(f"old-{n}") for n in range(5)]
    for event in events:
        age(event, days=40)

    settings.KANA_WEBHOOK_HISTORY_DAYS = 0
    assert retention.prune_history(time_budget_seconds=30, batch_size=2) == 0
    assert WebhookEvent.objects.count() == 5

    settings.KANA_WEBHOOK_HISTORY_DAYS = 30
    assert retention.prune_history(time_budget_seconds=30, batch_size=2) == 5
    assert not WebhookEvent.objects.exists() and not WebhookDelivery.objects.exists()


def test_the_daily_task_prunes_and_beat_runs_it(api, notify):
    with Receiver() as receiver:
        create_endpoint(api, receiver.url, ["usage.limit_reached"])
        age(notify("old"), days=31)
        notify("new")

    assert tasks.prune_history.apply().get() == 1
    assert list(WebhookEvent.objects.values_list("event_key", flat=True)) == ["new"]
    schedule = django_settings.CELERY_BEAT_SCHEDULE.values()
    (scheduled,) = [entry for entry in schedule if entry["task"] == "webhooks.tasks.prune_history"]
    assert scheduled["schedule"] == 24 * 3600
