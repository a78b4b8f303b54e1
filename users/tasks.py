"""Celery tasks for CSV imports. Tasks take ids and call the services."""

import logging

from celery import shared_task
from django.db import InterfaceError, OperationalError

from kana import jobs

from . import csv_import
from .models import ImportJob

logger = logging.getLogger(__name__)


@shared_task(**jobs.JOB_TASK_OPTIONS, max_retries=5)
def run_import(job_id: int) -> None:
    """Run an import job. All or nothing: a retry after a transient database error (or a
    redelivery after the worker died) starts the file again from its first row."""
    csv_import.run_import_job(job_id=job_id, requeue_on=(OperationalError, InterfaceError))


@shared_task(acks_late=True, ignore_result=True)
def sweep_stalled_imports() -> int:
    """Re-enqueue imports whose message was never sent or whose worker died."""
    return jobs.sweep(ImportJob, csv_import.IMPORT_TASK)
