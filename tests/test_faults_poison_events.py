"""Issue 15, item 2: poison events never block a job.

An event stored while unmapped that the rules cannot decide (an amount the usage column
cannot hold, a number beyond a float's range, a value the evaluator chokes on) is left
unmapped with a reason and the job moves on. A chunk that fails again and again (here: a
real PostgreSQL trigger refusing the usage insert) ends its job ``failed`` with the reason,
shown by the API and the dashboard, instead of re-queueing it forever.
"""

from decimal import Decimal

import pytest
from django.db import connection

from features.mapping import RuleSet, decide
from features.models import Event, EventStatus, ReprocessingJob, UnmappedReason, Usage
from features.reprocessing import MAX_CHUNK_FAILURES
from features.rules import CompiledRule
from kana.jobs import JobStatus
from tests.api_support import ApiClient
from tests.conftest import requires_broker, requires_postgres, wait_until
from tests.usage_support import make_feature, make_rule, make_user, store_unmapped_events, usage_total

HUGE = 10**400

POISONED = [
    ("Credits Used", {"delta": 5}),
    ("Credits Used", {"delta": 1e19}),  # fits numeric(30, 9): InvalidOperation before the fix
    ("Credits Used", {"delta": 1e21}),  # does not fit
    ("Credits Used", {"delta": "lots"}),
    ("Seats Added", {"n": HUGE}),  # OverflowError in the comparison before the fix
    ("Seats Added", {"n": 6}),
]


def _reasons(workspace, name: str) -> list[tuple[str, str]]:
    events = Event.objects.for_workspace(workspace).filter(name=name).order_by("id")
    return list(events.values_list("status", "unmapped_reason"))


def _job(rule) -> ReprocessingJob:
    return ReprocessingJob.objects.filter(rule=rule).latest("pk")


@pytest.mark.usefixtures("tasks_in_process")
def test_stored_events_the_rules_cannot_decide_never_stop_a_job(tenant, django_capture_on_commit_callbacks):
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, POISONED)
    make_feature(tenant.workspace, "credits")
    make_feature(tenant.workspace, "seats")

    with django_capture_on_commit_callbacks(execute=True):
        credits = make_rule(tenant.workspace, "credits", event="Credits Used")
    with django_capture_on_commit_callbacks(execute=True):
        seats = make_rule(
            tenant.workspace, "seats", event="Seats Added", conditions=[{"property": "n", "operator": "gt", "value": 5}]
        )

    assert (_job(credits).status, _job(credits).scanned, _job(credits).mapped) == (JobStatus.DONE, 4, 2)
    assert (_job(seats).status, _job(seats).scanned, _job(seats).mapped) == (JobStatus.DONE, 2, 1)
    assert _reasons(tenant.workspace, "Credits Used") == [
        (EventStatus.MAPPED, ""),
        (EventStatus.MAPPED, ""),
        (EventStatus.UNMAPPED, UnmappedReason.INVALID_AMOUNT),
        (EventStatus.UNMAPPED, UnmappedReason.INVALID_DELTA),
    ]
    assert _reasons(tenant.workspace, "Seats Added") == [
        (EventStatus.UNMAPPED, UnmappedReason.NO_MATCHING_RULE),
        (EventStatus.MAPPED, ""),
    ]
    if connection.vendor == "postgresql":  # SQLite keeps numerics as floats
        assert usage_total(tenant.workspace, "credits") == Decimal("10000000000000000005")


def test_an_event_the_evaluator_cannot_handle_is_unmapped_as_invalid_value():
    # A condition no validation lets through today, as an older row might hold it.
    broken = CompiledRule(
        rule_id=1,
        feature_id=1,
        event_name="E",
        conditions=({"property": "plan", "operator": "in", "value": 5},),
        amount_property=None,
    )
    decision = decide(RuleSet(version=1, feature_ids={}, rules=(broken,)), "E", {"plan": "pro"})
    assert (decision.status, decision.reason, decision.usages) == (EventStatus.UNMAPPED, "invalid_value", [])


@pytest.fixture
def usage_refused_for():
    """A real fault: a trigger that makes PostgreSQL refuse usage rows for one feature."""
    features = []

    def install(feature) -> None:
        features.append(feature)
        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                CREATE FUNCTION refuse_usage_for_test() RETURNS trigger AS $$
                BEGIN
                    IF NEW.feature_id = {int(feature.pk)} THEN
                        RAISE EXCEPTION 'usage refused by the test trigger';
                    END IF;
                    RETURN NEW;
                END $$ LANGUAGE plpgsql;
                CREATE TRIGGER refuse_usage_for_test BEFORE INSERT ON {Usage._meta.db_table}
                    FOR EACH ROW EXECUTE FUNCTION refuse_usage_for_test();
                """
            )

    yield install
    # Created inside the test's transaction, so rolled back with it.


@requires_postgres
@pytest.mark.usefixtures("tasks_in_process")
def test_a_chunk_that_keeps_failing_ends_its_job_failed_with_the_reason(
    tenant, member_client, django_capture_on_commit_callbacks, usage_refused_for
):
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, [("Exported", {}), ("Viewed", {})])
    refused = make_feature(tenant.workspace, "exports")
    make_feature(tenant.workspace, "views")
    usage_refused_for(refused)

    with django_capture_on_commit_callbacks(execute=True):
        rule = make_rule(tenant.workspace, "exports", event="Exported", name="Exports")
    job = _job(rule)
    assert (job.status, job.failures, job.scanned) == (JobStatus.FAILED, MAX_CHUNK_FAILURES, 0)
    assert "usage refused by the test trigger" in job.error
    assert job.finished_at is not None

    body = ApiClient(tenant).get(f"rules/{rule.pk}").json()
    assert body["reprocessing"]["status"] == "failed"
    assert "usage refused by the test trigger" in body["reprocessing"]["error"]
    page = member_client.get("/rules/")
    assert page.status_code == 200 and "usage refused by the test trigger" in page.content.decode()
    progress = member_client.get(f"/rules/{rule.pk}/progress/").json()
    assert progress["status"] == "failed" and "usage refused" in progress["error"]

    # The workspace's later jobs are not held behind it.
    with django_capture_on_commit_callbacks(execute=True):
        later = make_rule(tenant.workspace, "views", event="Viewed", name="Views")
    assert (_job(later).status, _job(later).mapped) == (JobStatus.DONE, 1)
    assert Event.objects.get(name="Exported").status == EventStatus.UNMAPPED


@requires_broker
def test_a_worker_finishes_every_job_despite_poison_events(celery_worker, tenant):
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, POISONED * 5)
    make_feature(tenant.workspace, "credits")
    make_feature(tenant.workspace, "seats")
    credits = make_rule(tenant.workspace, "credits", event="Credits Used")
    seats = make_rule(
        tenant.workspace, "seats", event="Seats Added", conditions=[{"property": "n", "operator": "gt", "value": 5}]
    )
    wait_until(
        lambda: {_job(credits).status, _job(seats).status} == {JobStatus.DONE},
        timeout=45,
        message="both jobs done",
    )
    assert (_job(credits).mapped, _job(seats).mapped) == (10, 5), celery_worker.output()[-2000:]
    assert Usage.objects.for_workspace(tenant.workspace).count() == 15
