"""Issue 15: a deleted user's unmapped events used to stay unmapped for good.

Deleting a user detaches its events (they stay, for the record). Reprocessing only maps
events that have a user, so no rule or feature created later could ever map them. Now such an
event counts for the user its userId resolves to at that moment, created if there is none,
exactly as a new track with that userId would.
"""

import pytest

from features.models import Event, EventStatus, ReprocessingJob, Usage
from kana.jobs import JobStatus
from tests.conftest import SegmentClient
from tests.usage_support import make_feature, make_rule
from users.models import EndUser
from users.selectors import user_pk_for
from users.services import delete_user


@pytest.mark.usefixtures("tasks_in_process")
def test_a_deleted_users_unmapped_events_are_mapped_by_a_later_rule(tenant, django_capture_on_commit_callbacks):
    segment = SegmentClient(tenant)
    for user_id in ("gone", "gone", "kept"):
        assert segment.track(user_id, "Exported").json()["status"] == "unmapped"
    assert segment.track("gone-too", "Used", {"featureId": "later"}).json()["reason"] == "unknown_feature"
    gone_pk = user_pk_for(tenant.workspace, "gone")
    delete_user(workspace=tenant.workspace, user_pk=gone_pk)
    delete_user(workspace=tenant.workspace, user_pk=user_pk_for(tenant.workspace, "gone-too"))
    assert Event.objects.filter(user__isnull=True).count() == 3

    make_feature(tenant.workspace, "exports")
    with django_capture_on_commit_callbacks(execute=True):
        rule = make_rule(tenant.workspace, "exports", event="Exported")
    with django_capture_on_commit_callbacks(execute=True):
        make_feature(tenant.workspace, "later")

    job = ReprocessingJob.objects.get(rule=rule)
    assert (job.status, job.scanned, job.mapped) == (JobStatus.DONE, 3, 3)
    assert not Event.objects.exclude(status=EventStatus.MAPPED).exists()
    assert not Event.objects.filter(user__isnull=True).exists()
    reborn = user_pk_for(tenant.workspace, "gone")
    assert reborn is not None and reborn != gone_pk
    assert EndUser.objects.for_workspace(tenant.workspace).filter(user_id="gone").count() == 1
    assert Usage.objects.filter(user_id=reborn, feature__key="exports").count() == 2
    assert Usage.objects.filter(user_id=user_pk_for(tenant.workspace, "kept")).count() == 1
    assert Usage.objects.filter(user_id=user_pk_for(tenant.workspace, "gone-too"), feature__key="later").count() == 1
