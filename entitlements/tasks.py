"""Entitlements' periodic work: expired holds are marked expired (reads ignore them already);
usage threshold crossings are recorded and notified."""

from celery import shared_task

from .access import expire_reservations
from .thresholds import notify_usage_thresholds


@shared_task(acks_late=True, reject_on_worker_lost=True, expires=60)
def sweep_expired_reservations() -> int:
    return expire_reservations()


@shared_task(acks_late=True, reject_on_worker_lost=True, expires=60)
def notify_thresholds() -> int:
    """Drain the touched pairs in bounded batches (one transaction each) until a batch comes
    back short; returns the crossings recorded."""
    total = 0
    for _ in range(100):  # at most 50,000 pairs a run; the next run takes the rest
        drained, crossed = notify_usage_thresholds(limit=BATCH)
        total += crossed
        if drained < BATCH:
            break
    return total


BATCH = 500
