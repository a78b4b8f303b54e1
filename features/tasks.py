"""Celery tasks for reprocessing. Tasks take ids and call the services."""

import logging
import time

from celery import shared_task
from celery.signals import worker_ready
from django.db import InterfaceError, OperationalError, close_old_connections

from . import reprocessing

logger = logging.getLogger(__name__)

# A task gives the worker back after this long and re-enqueues itself, so one huge job
# cannot starve the others (Saleor's habit).
TIME_SLICE_SECONDS = 30
# A failed chunk is tried again after this long (reprocessing.MAX_CHUNK_FAILURES times in all).
CHUNK_RETRY_SECONDS = 5


@shared_task(
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=True,
    max_retries=10,
)
def run_reprocessing_job(job_id: int) -> None:
    if not reprocessing.claim_job(job_id):
        return
    started = time.monotonic()
    try:
        while True:
            result = reprocessing.process_chunk(job_id)
            if result.finished:
                return
            if time.monotonic() - started > TIME_SLICE_SECONDS and not run_reprocessing_job.app.conf.task_always_eager:
                if _send_again(job_id):
                    return
                started = time.monotonic()  # the broker is unreachable: keep the job going here
    except (OperationalError, InterfaceError):
        raise  # transient: autoretry; the cursor keeps what was done
    except Exception as exc:  # anything else failed this chunk: count it, try again, give up at the limit
        logger.exception("reprocessing chunk failed", extra={"job_id": job_id})
        if reprocessing.record_chunk_failure(job_id, f"{type(exc).__name__}: {exc}"):
            return  # failed for good: the rule's progress shows the error
        if not _send_again(job_id, countdown=CHUNK_RETRY_SECONDS):
            raise  # the broker is unreachable: the sweeper sends the job again later


def _send_again(job_id: int, countdown: float | None = None) -> bool:
    try:
        run_reprocessing_job.apply_async(kwargs={"job_id": job_id}, countdown=countdown)
    except Exception:  # kombu/redis raise many types when the broker is unreachable
        logger.warning("reprocessing job not re-enqueued; continuing in this task", extra={"job_id": job_id})
        return False
    return True


@shared_task(acks_late=True, ignore_result=True)
def sweep_stalled_jobs() -> int:
    """Re-enqueue jobs whose message was never sent or whose worker died."""
    ids = reprocessing.stalled_job_ids()
    for job_id in ids:
        logger.info("re-enqueueing stalled reprocessing job", extra={"job_id": job_id})
        run_reprocessing_job.delay(job_id=job_id)
    return len(ids)


@worker_ready.connect
def _sweep_on_start(**_kwargs) -> None:
    # A fresh worker picks up what a dead one left, without waiting for beat.
    close_old_connections()
    try:
        sweep_stalled_jobs.delay()
    except Exception:  # the broker may be unreachable right at start: beat will sweep later
        logger.warning("initial sweep not enqueued")
