"""Celery tasks for reprocessing. Tasks take ids and call the services."""

import logging
import time

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from kana import jobs

from . import ledger, reprocessing
from .models import ReprocessingJob
from .services import REPROCESSING_TASK

logger = logging.getLogger(__name__)

# A task gives the worker back after this long and re-enqueues itself, so one huge job
# cannot starve the others (Saleor's habit).
TIME_SLICE_SECONDS = 30
# A failed chunk is tried again after this long (reprocessing.MAX_CHUNK_FAILURES times in all).
CHUNK_RETRY_SECONDS = 5


# A job waiting for its workspace's running job tries again after this long.
WAIT_SECONDS = 2


# A run gives the worker back every TIME_SLICE_SECONDS; a chunk that runs for minutes is
# stuck. The soft limit raises in the task (counted as a failed chunk); the hard one kills
# the process if even that does not return.
@jobs.job_task(max_retries=10, soft_time_limit=5 * 60, time_limit=6 * 60)
def run_reprocessing_job(job_id: int) -> None:
    if run_reprocessing_job.app.conf.task_always_eager:
        state = jobs.Claim.CLAIMED if reprocessing.claim_job(job_id) else jobs.Claim.FINISHED
    else:
        # At most KANA_JOBS_PER_WORKSPACE jobs of a workspace at once: the others wait their
        # turn, so one workspace's rules cannot hold every worker.
        state = reprocessing.claim_job_or_wait(job_id, limit=settings.KANA_JOBS_PER_WORKSPACE)
    if state == jobs.Claim.WAIT:
        _send_again(job_id, countdown=WAIT_SECONDS)  # if the broker is down, the sweeper will
        return
    if state == jobs.Claim.FINISHED:
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
    return jobs.send_again(
        run_reprocessing_job,
        job_id,
        countdown=countdown,
        warning="reprocessing job not re-enqueued; continuing in this task",
    )


@shared_task(acks_late=True, ignore_result=True, expires=60, time_limit=60)
def sweep_stalled_jobs() -> int:
    """Re-enqueue jobs whose message was never sent or whose worker died."""
    return jobs.sweep(ReprocessingJob, REPROCESSING_TASK)


@shared_task(acks_late=True, ignore_result=True, expires=60 * 60, time_limit=10 * 60)
def expire_pending_anonymous_events() -> int:
    """Held anonymous events past their workspace's hold window become ``expired``: counted
    (``features.selectors.anonymous_event_counts``), never mapped, never silently dropped."""
    expired = ledger.expire_pending_events(timezone.now())
    if expired:
        logger.info(
            "pending anonymous events expired", extra={"workspaces": len(expired), "events": sum(expired.values())}
        )
    return sum(expired.values())


jobs.sweep_when_a_worker_starts(sweep_stalled_jobs)
