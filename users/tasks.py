"""Celery tasks for CSV imports. Tasks take ids and call the services."""

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from kana import jobs

from . import csv_import
from .models import ImportJob, ImportStatus

# An import waiting for its workspace's running import tries again after this long.
WAIT_SECONDS = 5


# One import is one transaction (all or nothing), at thousands of rows a second: an hour is
# far beyond any file the API takes. The soft limit fails the import cleanly.
@jobs.job_task(max_retries=5, soft_time_limit=60 * 60, time_limit=61 * 60)
def run_import(job_id: int) -> None:
    """Run an import job. All or nothing: a retry after a transient database error (or a
    redelivery after the worker died) starts the file again from its first row.

    At most KANA_JOBS_PER_WORKSPACE imports of one workspace run at once; the others wait
    their turn, so one workspace's uploads cannot hold every worker."""
    eager = run_import.app.conf.task_always_eager
    job = csv_import.run_import_job(
        job_id=job_id,
        requeue_on=(OperationalError, InterfaceError),
        workspace_limit=None if eager else settings.KANA_JOBS_PER_WORKSPACE,
    )
    if job.status == ImportStatus.QUEUED:
        jobs.send_again(
            run_import, job_id, countdown=WAIT_SECONDS, warning="waiting import not re-enqueued; the sweeper will"
        )


@shared_task(acks_late=True, ignore_result=True, expires=60, time_limit=60)
def sweep_stalled_imports() -> int:
    """Re-enqueue imports whose message was never sent or whose worker died."""
    return jobs.sweep(ImportJob, csv_import.IMPORT_TASK)
