"""The sweeper that re-sends jobs whose message was lost or whose worker died (kana.jobs),
for both kinds of job. Issue 11, defect 3: the import sweeper did not stamp the jobs it
re-sent, so a queued import was re-sent at every sweep while the workers were busy."""

from datetime import timedelta

import pytest
from django.utils import timezone

from features.models import ReprocessingJob
from kana import jobs
from kana.jobs import JobStatus
from users.models import ImportJob


def _old(seconds=3600):
    return timezone.now() - timedelta(seconds=seconds)


@pytest.mark.parametrize("model", [ImportJob, ReprocessingJob])
def test_a_queued_job_whose_message_was_lost_is_re_sent_once_per_stale_period(tenant, model):
    job = model.objects.create(workspace=tenant.workspace, created_at=_old())

    assert jobs.stalled_job_ids(model) == [job.pk]
    assert jobs.stalled_job_ids(model) == []  # stamped: not again at the next sweep

    model.objects.filter(pk=job.pk).update(heartbeat_at=_old())  # a stale period later
    assert jobs.stalled_job_ids(model) == [job.pk]


@pytest.mark.parametrize("model", [ImportJob, ReprocessingJob])
def test_a_running_job_whose_worker_stopped_beating_is_re_sent(tenant, model):
    dead = model.objects.create(workspace=tenant.workspace, status=JobStatus.RUNNING, heartbeat_at=_old())
    alive = model.objects.create(workspace=tenant.workspace, status=JobStatus.RUNNING, heartbeat_at=timezone.now())
    model.objects.create(workspace=tenant.workspace, status=JobStatus.DONE, created_at=_old())

    assert jobs.stalled_job_ids(model) == [dead.pk]
    assert alive.pk not in jobs.stalled_job_ids(model)


def test_a_fresh_queued_job_is_left_to_its_message(tenant):
    ImportJob.objects.create(workspace=tenant.workspace)
    assert jobs.stalled_job_ids(ImportJob) == []


def test_an_import_is_never_claimed_twice_but_a_dead_workers_import_is_taken_over(tenant):
    job = ImportJob.objects.create(workspace=tenant.workspace)

    assert jobs.claim(ImportJob, job.pk, take_over_running=False)
    assert not jobs.claim(ImportJob, job.pk, take_over_running=False)  # its worker is alive

    ImportJob.objects.filter(pk=job.pk).update(heartbeat_at=_old())
    assert jobs.claim(ImportJob, job.pk, take_over_running=False)


def test_a_failed_job_keeps_its_reason_and_cannot_be_claimed(tenant):
    job = ReprocessingJob.objects.create(workspace=tenant.workspace)
    jobs.fail(ReprocessingJob, job.pk, "poison event 42")
    job.refresh_from_db()
    assert (job.status, job.error) == (JobStatus.FAILED, "poison event 42")
    assert not jobs.claim(ReprocessingJob, job.pk, take_over_running=True)
