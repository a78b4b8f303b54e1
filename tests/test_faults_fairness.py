"""Issue 15, fairness: one workspace's reprocessing or import cannot hold every worker, and
background tasks say how long they matter (``expires``) and may run (time limits)."""

import io
from datetime import timedelta

import pytest
from django.utils import timezone

from features import tasks as feature_tasks
from features.models import ReprocessingJob
from features.reprocessing import claim_job_or_wait, process_chunk
from kana.jobs import Claim, JobStatus
from tests.conftest import make_tenant
from tests.usage_support import make_feature, make_rule, make_user, store_unmapped_events
from users import tasks as user_tasks
from users.csv_import import import_users_csv, run_import_job
from users.models import ImportJob, ImportStatus


def _jobs(tenant, count: int) -> list[ReprocessingJob]:
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, [("E", {})] * 3)
    make_feature(tenant.workspace, "f")
    # Enqueued on commit, which never comes under the db fixture: the test claims them.
    rules = [make_rule(tenant.workspace, "f", event="E", name=f"r{n}") for n in range(count)]
    return [ReprocessingJob.objects.get(rule=rule) for rule in rules]


def test_a_workspace_runs_one_reprocessing_job_at_a_time_and_others_are_not_held(db):
    busy, other = make_tenant("Busy"), make_tenant("Other")
    first, second = _jobs(busy, 2)
    (theirs,) = _jobs(other, 1)

    assert claim_job_or_wait(first.pk, limit=1) == Claim.CLAIMED
    assert claim_job_or_wait(second.pk, limit=1) == Claim.WAIT
    assert ReprocessingJob.objects.get(pk=second.pk).status == JobStatus.QUEUED
    assert claim_job_or_wait(theirs.pk, limit=1) == Claim.CLAIMED  # another workspace is not held
    assert claim_job_or_wait(first.pk, limit=1) == Claim.CLAIMED  # its own next time slice
    assert claim_job_or_wait(second.pk, limit=2) == Claim.CLAIMED

    while not process_chunk(first.pk, chunk_size=2).finished:
        pass
    assert claim_job_or_wait(first.pk, limit=1) == Claim.FINISHED


def test_a_running_job_whose_worker_died_does_not_hold_its_workspace(db, settings):
    busy = make_tenant("Busy")
    first, second = _jobs(busy, 2)
    assert claim_job_or_wait(first.pk, limit=1) == Claim.CLAIMED
    stale = timezone.now() - timedelta(seconds=settings.KANA_JOB_STALE_SECONDS + 1)
    ReprocessingJob.objects.filter(pk=first.pk).update(heartbeat_at=stale)
    assert claim_job_or_wait(second.pk, limit=1) == Claim.CLAIMED


def _queued_import(tenant) -> ImportJob:
    data = io.BytesIO(b"user_id,email\nu1,a@example.com\nu2,b@example.com\n")
    return import_users_csv(workspace=tenant.workspace, file=data, dry_run=False, actor="test", run_inline=False)


def test_a_workspace_runs_one_import_at_a_time(db, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    busy, other = make_tenant("Busy"), make_tenant("Other")
    running, waiting, theirs = _queued_import(busy), _queued_import(busy), _queued_import(other)
    ImportJob.objects.filter(pk=running.pk).update(status=ImportStatus.RUNNING, heartbeat_at=timezone.now())

    assert run_import_job(job_id=waiting.pk, workspace_limit=1).status == ImportStatus.QUEUED
    assert run_import_job(job_id=theirs.pk, workspace_limit=1).status == ImportStatus.DONE

    stale = timezone.now() - timedelta(seconds=settings.KANA_JOB_STALE_SECONDS + 1)
    ImportJob.objects.filter(pk=running.pk).update(heartbeat_at=stale)
    assert run_import_job(job_id=waiting.pk, workspace_limit=1).status == ImportStatus.DONE


@pytest.mark.parametrize(
    "task,slow",
    [
        (feature_tasks.run_reprocessing_job, True),
        (user_tasks.run_import, True),
        (feature_tasks.sweep_stalled_jobs, False),
        (user_tasks.sweep_stalled_imports, False),
    ],
)
def test_every_task_states_how_long_it_matters_and_may_run(task, slow):
    assert task.expires and task.time_limit
    assert task.acks_late
    if slow:
        assert task.soft_time_limit and task.soft_time_limit < task.time_limit
        assert task.reject_on_worker_lost
