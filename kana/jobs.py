"""Background jobs: one status model and one set of moves for every kind of job.

A job is a row (``Job`` subclasses: reprocessing, CSV imports) and a Celery task that takes
its id. The row is the truth; the broker is only a doorbell:
- a job is created ``queued`` and its task is sent after the transaction commits
  (``enqueue_on_commit``); if the broker is down the job simply stays queued;
- a worker claims it with a conditional UPDATE (``claim``: healthchecks' habit), so two
  deliveries of one message cannot both run it, and writes ``heartbeat_at`` as it goes;
- the sweeper (Celery beat, and once when a worker starts) re-sends queued jobs whose
  message was lost and running jobs whose worker stopped beating (``stalled_job_ids``); it
  stamps every job it re-sends, so a job waiting behind a busy queue is re-sent once per
  stale period, not at every sweep.
Tasks are found by name (``enqueue``): a service that enqueues a job does not import the
module of its task (which imports the service), and Celery itself is imported only where a
task is defined or sent, not at Django's start (every command and web worker paid for it:
≈ 45 ms of a command's start-up, 10 MB of its memory; docs/performance-history.md, "Round 19").
"""

import importlib
import logging
from functools import partial

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, models, transaction
from django.db.models.functions import Coalesce
from django.utils import timezone

from .locks import lock_workspace_jobs
from .models import Workspace, WorkspaceQuerySet

logger = logging.getLogger(__name__)


class JobStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)

# How every job's task is delivered (PostHog's habit): acknowledged once it ran, sent again
# if its worker dies, retried with backoff for transient database errors only (the job's
# row keeps its progress).
JOB_TASK_OPTIONS = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": True,
}
# A job's message that waited this long in the queue is dropped: the sweeper re-sends jobs
# still queued or stalled, so nothing is lost, and duplicates do not pile up.
MESSAGE_EXPIRES_SECONDS = 15 * 60


def job_task(*, max_retries: int, soft_time_limit: int, time_limit: int):
    """The Celery task decorator of a kind of job: JOB_TASK_OPTIONS, messages that expire after
    MESSAGE_EXPIRES_SECONDS, and the kind's own retry count and time limits."""
    return celery_app().task(
        **JOB_TASK_OPTIONS,
        expires=MESSAGE_EXPIRES_SECONDS,
        max_retries=max_retries,
        soft_time_limit=soft_time_limit,
        time_limit=time_limit,
    )


def send_again(task, job_id: int, *, warning: str, countdown: float | None = None) -> bool:
    """Send a job's task once more (a job waiting its turn, or handing itself over to a fresh
    task). False, with ``warning`` logged, when the broker is unreachable."""
    try:
        task.apply_async(kwargs={"job_id": job_id}, countdown=countdown)
    except Exception:  # kombu/redis raise many types when the broker is unreachable
        logger.warning(warning, extra={"job_id": job_id})
        return False
    return True


class Job(models.Model):
    """The columns every job has. ``heartbeat_at`` of a queued job is when it was last sent."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED)
    error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        abstract = True


def enqueue(task_name: str, job_id: int) -> bool:
    """Send a job's task now. False (logged) when the broker is unreachable: the job stays
    queued and the sweeper sends it once the broker is back. In the embedded default
    (eager tasks) the task runs here and its errors propagate."""
    task = registered_task(task_name)
    try:
        task.delay(job_id=job_id)
    except Exception:  # kombu/redis raise many types when the broker is unreachable
        if task.app.conf.task_always_eager:
            raise
        logger.warning("job not enqueued; the sweeper will retry", extra={"task": task_name, "job_id": job_id})
        return False
    return True


def celery_app():
    """Kana's Celery app (``kana.celery``), configured from the settings; imported on first use."""
    from .celery import app

    return app


def registered_task(task_name: str):
    """The task called ``task_name`` (``<app>.tasks.<function>``), its module imported first:
    a task registers with the app when its module is imported, which a worker does at start
    and any other process only here."""
    app = celery_app()
    importlib.import_module(task_name.rpartition(".")[0])
    return app.tasks[task_name]


def enqueue_on_commit(task_name: str, job_id: int) -> None:
    """Send the task once the job's row is committed (a worker could not see it before)."""
    transaction.on_commit(partial(enqueue, task_name, job_id))


def claim(model: type[Job], job_id: int, *, take_over_running: bool) -> bool:
    """queued -> running, in one conditional UPDATE; False when someone else has it or it ended.

    ``take_over_running``: a running job may be claimed again whatever its heartbeat. For jobs
    whose every step locks the job row (reprocessing chunks) and which hand themselves over
    to a fresh task; otherwise only a running job whose worker stopped beating is taken over.
    """
    now = timezone.now()
    jobs = model.objects.filter(pk=job_id)
    claimed = jobs.filter(status=JobStatus.QUEUED).update(status=JobStatus.RUNNING, heartbeat_at=now)
    if not claimed:
        running = jobs.filter(status=JobStatus.RUNNING)
        if not take_over_running:
            running = running.filter(heartbeat_at__lt=now - _stale_after())
        claimed = running.update(heartbeat_at=now)
    if claimed:
        jobs.filter(started_at__isnull=True).update(started_at=now)
    return claimed == 1


class Claim(models.TextChoices):
    CLAIMED = "claimed"
    WAIT = "wait"  # the workspace runs its share of jobs already: try again shortly
    FINISHED = "finished"  # done, failed, or someone else's: nothing to run


def claim_within_limit(
    model: type[Job],
    job_id: int,
    *,
    take_over_running: bool,
    workspace_limit: int,
    same_job_field: str | None = None,
) -> Claim:
    """``claim``, unless ``workspace_limit`` other jobs of the job's workspace are running (with
    a fresh heartbeat): then WAIT, and the job stays queued, stamped as sent now.

    The per-tenant cap PostHog's tasks have: one workspace's backfill cannot hold every
    worker. Claims of one workspace are serialised by an advisory lock, so the cap is exact.
    ``same_job_field``: a nullable foreign key from a row to the first row of the job it is a
    part of (reprocessing jobs split into parts); the running parts of one job count as one
    job, and the job's own parts do not count against it.
    """
    now = timezone.now()
    with transaction.atomic():
        fields = ("workspace_id", "status", same_job_field) if same_job_field else ("workspace_id", "status")
        job = model.objects.filter(pk=job_id).values(*fields).first()
        if job is None or job["status"] not in UNFINISHED:
            return Claim.FINISHED
        lock_workspace_jobs(job["workspace_id"])
        others = model.objects.for_workspace(job["workspace_id"]).filter(
            status=JobStatus.RUNNING, heartbeat_at__gte=now - _stale_after()
        )
        if same_job_field:
            same_job = Coalesce(same_job_field, "pk")
            own = job[same_job_field] or job_id
            others = others.annotate(same_job=same_job).exclude(same_job=own)
            running = others.values("same_job").distinct().count()
        else:
            running = others.exclude(pk=job_id).count()
        if running >= workspace_limit:
            model.objects.filter(pk=job_id, status=JobStatus.QUEUED).update(heartbeat_at=now)
            return Claim.WAIT
        return Claim.CLAIMED if claim(model, job_id, take_over_running=take_over_running) else Claim.FINISHED


def fail(model: type[Job], job_id: int, error: str, **fields) -> None:
    """End an unfinished job as failed with the reason (kept short for the API and dashboard)."""
    model.objects.filter(pk=job_id, status__in=UNFINISHED).update(
        status=JobStatus.FAILED, error=error[:2000], finished_at=timezone.now(), **fields
    )


def stalled_job_ids(model: type[Job]) -> list[int]:
    """Jobs to send again, stamped as sent now: queued ones whose message was lost (never
    sent, or sent longer ago than the stale period) and running ones whose worker died."""
    now = timezone.now()
    cutoff = now - _stale_after()
    queued = model.objects.annotate(last_sent=Coalesce("heartbeat_at", "created_at")).filter(
        status=JobStatus.QUEUED, last_sent__lt=cutoff
    )
    stalled = model.objects.filter(status=JobStatus.RUNNING, heartbeat_at__lt=cutoff)
    ids = set(queued.values_list("id", flat=True)) | set(stalled.values_list("id", flat=True))
    # A queued job's heartbeat is when it was last sent; a running one's is its worker's, and
    # the re-sent task's claim stamps it.
    model.objects.filter(id__in=ids, status=JobStatus.QUEUED).update(heartbeat_at=now)
    return sorted(ids)


def sweep(model: type[Job], task_name: str) -> int:
    """Re-send every stalled job of ``model``; returns how many were sent."""
    ids = stalled_job_ids(model)
    for job_id in ids:
        logger.info("re-sending stalled job", extra={"task": task_name, "job_id": job_id})
        enqueue(task_name, job_id)
    return len(ids)


def sweep_when_a_worker_starts(task) -> None:
    """Send ``task`` (a sweeper) whenever a worker starts, so a fresh worker picks up what a
    dead one left without waiting for beat."""

    def send(**_kwargs) -> None:
        close_old_connections()
        try:
            task.delay()
        except Exception:  # the broker may be unreachable right at start: beat will sweep later
            logger.warning("initial sweep not enqueued", extra={"task": task.name})

    from celery.signals import worker_ready

    worker_ready.connect(send, weak=False, dispatch_uid=f"sweep-at-start:{task.name}")


def _stale_after():
    return timezone.timedelta(seconds=settings.KANA_JOB_STALE_SECONDS)
