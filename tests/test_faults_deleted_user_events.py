"""Issue 15: a deleted user's unmapped events used to stay unmapped for good.

Deleting a user with ``events=keep`` (the default) detaches and anonymises its events (they
stay, for the record and for the feature totals). Reprocessing maps them like any event: a
rule or feature created later counts them for their feature, with no user (SPEC §12: the
deleted user's userIds are suppressed, so no user is created again for them).
"""

import pytest

from features.models import Event, EventStatus, ReprocessingJob, Usage
from kana.jobs import JobStatus
from tests.conftest import SegmentClient
from tests.usage_support import make_feature, make_rule
from users.models import EndUser
from users.selectors import user_pk_for
from users.services import delete_user

# Every test here sends Segment messages: run each on both ingest routes (conftest).
pytestmark = pytest.mark.usefixtures("ingest_route")


@pytest.mark.usefixtures("tasks_in_process")
def test_a_deleted_users_unmapped_events_are_mapped_by_a_later_rule(tenant, django_capture_on_commit_callbacks):
    segment = SegmentClient(tenant)
    for user_id in ("gone", "gone", "kept"):
        assert segment.track(user_id, "Exported").json()["status"] == "unmapped"
    assert segment.track("gone-too", "Used", {"featureId": "later"}).json()["reason"] == "unknown_feature"
    delete_user(workspace=tenant.workspace, user_pk=user_pk_for(tenant.workspace, "gone"))
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
    assert Event.objects.filter(user__isnull=True).count() == 3
    assert not EndUser.objects.for_workspace(tenant.workspace).filter(user_id__in=["gone", "gone-too"]).exists()
    assert Usage.objects.filter(user__isnull=True, feature__key="exports").count() == 2
    assert Usage.objects.filter(user_id=user_pk_for(tenant.workspace, "kept")).count() == 1
    assert Usage.objects.filter(user__isnull=True, feature__key="later").count() == 1


@pytest.mark.usefixtures("tasks_in_process")
def test_an_event_detached_with_its_user_id_is_attached_unless_suppressed(tenant, django_capture_on_commit_callbacks):
    """Events detached before suppression existed still carry their userId: reprocessing gives
    them the user it resolves to, except for a suppressed userId."""
    segment = SegmentClient(tenant)
    for user_id in ("old", "suppressed"):
        assert segment.track(user_id, "Exported").json()["status"] == "unmapped"
    delete_user(workspace=tenant.workspace, user_pk=user_pk_for(tenant.workspace, "suppressed"))
    # As a deletion before SPEC §12 left it: detached, the userId kept, nothing suppressed.
    Event.objects.filter(external_user_id="old").update(user=None)
    EndUser.objects.filter(user_id="old").delete()
    Event.objects.filter(status=EventStatus.UNMAPPED, external_user_id="").update(external_user_id="suppressed")

    make_feature(tenant.workspace, "exports")
    with django_capture_on_commit_callbacks(execute=True):
        make_rule(tenant.workspace, "exports", event="Exported")

    assert Usage.objects.filter(user_id=user_pk_for(tenant.workspace, "old")).count() == 1
    assert user_pk_for(tenant.workspace, "suppressed") is None
    assert Usage.objects.filter(user__isnull=True).count() == 1
