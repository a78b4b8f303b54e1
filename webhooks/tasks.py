"""Celery tasks for webhook deliveries. Tasks take ids and call ``webhooks.delivery``."""

from celery import shared_task

from kana import jobs

from . import delivery, retention

# One sweep sends for at most this long, then gives the worker back; the next sweep goes on.
SWEEP_BUDGET_SECONDS = 30


# Sent on commit for each new delivery (kana.jobs.enqueue_on_commit). Its message only rings
# the bell: a lost or expired one costs a sweep's wait, never the delivery.
@jobs.job_task(max_retries=3, soft_time_limit=60, time_limit=90)
def send_delivery(job_id: int) -> None:
    delivery.send_if_due(job_id)


@shared_task(
    acks_late=True,
    ignore_result=True,
    expires=60,
    soft_time_limit=SWEEP_BUDGET_SECONDS + 60,
    time_limit=SWEEP_BUDGET_SECONDS + 90,
)
def send_due_deliveries() -> int:
    """Attempt every pending delivery that is due: retries, and first attempts whose message
    was lost (the broker was down at commit, or the worker died)."""
    return delivery.send_due(time_budget_seconds=SWEEP_BUDGET_SECONDS)


jobs.sweep_when_a_worker_starts(send_due_deliveries)


@shared_task(acks_late=True, ignore_result=True, expires=3600, soft_time_limit=360, time_limit=420)
def prune_history() -> int:
    """Daily: delete webhook history past ``KANA_WEBHOOK_HISTORY_DAYS`` (``webhooks.retention``);
    what one run leaves (a budget of five minutes) the next one takes."""
    return retention.prune_history(time_budget_seconds=300)
