"""How long webhook history is kept: events, their deliveries and attempts.

Every notification stores an event, a delivery per listening endpoint and a row per attempt,
and nothing else ever removes them; a busy workspace's threshold crossings would grow these
tables without end. Celery beat prunes them once a day (``webhooks.tasks.prune_history``):
an event older than ``KANA_WEBHOOK_HISTORY_DAYS`` goes with its deliveries and attempts once
none of its deliveries is still pending (a delivery still being retried keeps its event,
whatever its age). ``0`` keeps everything.

Pruning cannot make Kana send a notification twice: the ``event_key`` an event was stored
under exists to absorb a retried transaction within seconds, and every notification's
source records its own fact once (a threshold crossing, a merge, a subscription change), so
an old key is never notified again.
"""

import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .models import DeliveryStatus, WebhookEvent

# Events deleted per transaction: short transactions, and row locks held briefly.
PRUNE_BATCH = 500


def prune_history(*, time_budget_seconds: float, batch_size: int = PRUNE_BATCH) -> int:
    """Delete the events older than the retention with no pending delivery, with their
    deliveries and attempts, a batch per transaction, until none is left or the budget is
    spent (the next run goes on). Returns how many events were deleted."""
    days = settings.KANA_WEBHOOK_HISTORY_DAYS
    if days <= 0:
        return 0
    cutoff = timezone.now() - timedelta(days=days)
    started, deleted = time.monotonic(), 0
    while time.monotonic() - started < time_budget_seconds:
        with transaction.atomic():
            batch = list(
                WebhookEvent.objects.filter(created_at__lt=cutoff)
                .exclude(deliveries__status=DeliveryStatus.PENDING)
                .order_by("created_at", "pk")
                .values_list("pk", flat=True)[:batch_size]
            )
            if not batch:
                break
            # Nothing puts a finished delivery back to pending, so the batch read above is
            # what goes (its deliveries and attempts cascade).
            _, removed = WebhookEvent.objects.filter(pk__in=batch).delete()
            deleted += removed.get(WebhookEvent._meta.label, 0)
    return deleted
