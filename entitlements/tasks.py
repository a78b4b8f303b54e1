"""Entitlements' periodic work: expired holds are marked expired (reads ignore them already)."""

from celery import shared_task

from .access import expire_reservations


@shared_task(acks_late=True, reject_on_worker_lost=True, expires=60)
def sweep_expired_reservations() -> int:
    return expire_reservations()
