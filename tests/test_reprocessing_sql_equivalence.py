"""Reprocessing decided in SQL maps the same events with the same amounts as the evaluator.

The corpus of awkward events and the table of rules from the preview's equivalence tests:
each rule is created in two workspaces holding the same events, and its job runs with the
SQL path (and its per-row fallback to the evaluator) in one and with the evaluator alone in
the other. Events (status, reason) and usage (feature, rule, amount, user, time) must be the
same message for message. PostgreSQL only: SQLite has the evaluator alone.
"""

from decimal import Decimal

import pytest

from features import reprocessing
from features.models import Event, EventStatus, ReprocessingJob, Usage
from kana.jobs import JobStatus
from tests.conftest import requires_postgres
from tests.test_rule_preview_equivalence import RULES, _existing_rule, store_corpus
from tests.usage_support import make_feature, make_rule, make_user, store_unmapped_events

pytestmark = [requires_postgres, pytest.mark.usefixtures("tasks_in_process")]


def _outcome(workspace):
    events = sorted(Event.objects.filter(workspace=workspace).values_list("message_id", "status", "unmapped_reason"))
    usage = sorted(
        (message_id, feature, rule_name, Decimal(amount).normalize(), user, moment)
        for message_id, feature, rule_name, amount, user, moment in Usage.objects.filter(
            workspace=workspace
        ).values_list("event__message_id", "feature__key", "rule__name", "amount", "user__user_id", "occurred_at")
    )
    return events, usage


def _create_and_run(workspace, capture, event, conditions, amount_property, *, chunk_size):
    with capture(execute=True):
        rule = make_rule(
            workspace, "target", event=event, conditions=conditions, amount_property=amount_property, name="new"
        )
    job = ReprocessingJob.objects.filter(rule=rule).latest("pk")
    while job.status != JobStatus.DONE:  # the task ran at commit; smaller chunks walk on here
        reprocessing.process_chunk(job.pk, chunk_size=chunk_size)
        job.refresh_from_db()
    return job


@pytest.mark.parametrize(("event", "conditions", "amount_property"), RULES)
def test_sql_and_evaluator_map_the_same_events_with_the_same_amounts(
    tenant, other_tenant, django_capture_on_commit_callbacks, monkeypatch, settings, event, conditions, amount_property
):
    settings.KANA_REPROCESS_CHUNK_SIZE = 37  # many chunks, each deciding part in SQL, part in Python
    for workspace in (tenant.workspace, other_tenant.workspace):
        store_corpus(workspace)
        _existing_rule(workspace, django_capture_on_commit_callbacks)

    in_sql = _create_and_run(
        tenant.workspace, django_capture_on_commit_callbacks, event, conditions, amount_property, chunk_size=37
    )
    with monkeypatch.context() as patched:
        patched.setattr(reprocessing, "_decided_in_sql", lambda job, rule_set, chunk_size: None)
        in_python = _create_and_run(
            other_tenant.workspace,
            django_capture_on_commit_callbacks,
            event,
            conditions,
            amount_property,
            chunk_size=37,
        )

    (sql_events, sql_usage), (python_events, python_usage) = (
        _outcome(tenant.workspace),
        _outcome(other_tenant.workspace),
    )
    assert set(sql_events) ^ set(python_events) == set()
    assert set(sql_usage) ^ set(python_usage) == set()
    assert (sql_events, sql_usage) == (python_events, python_usage)
    assert (in_sql.scanned, in_sql.mapped) == (in_python.scanned, in_python.mapped)


def test_a_simple_rule_is_decided_in_sql_without_the_evaluator(
    tenant, django_capture_on_commit_callbacks, monkeypatch, settings
):
    settings.KANA_REPROCESS_CHUNK_SIZE = 50
    user = make_user(tenant.workspace, "u1")
    tiers = ["pro", "free", "pro", "enterprise"] * 30
    store_unmapped_events(tenant.workspace, user, [("Report Exported", {"plan": {"tier": t}}) for t in tiers])
    make_feature(tenant.workspace, "target")
    decided_in_python = []
    original = reprocessing.decide
    monkeypatch.setattr(reprocessing, "decide", lambda *a: decided_in_python.append(a) or original(*a))

    job = _create_and_run(
        tenant.workspace,
        django_capture_on_commit_callbacks,
        "Report Exported",
        [{"property": "plan.tier", "operator": "equals", "value": "pro"}],
        None,
        chunk_size=50,
    )

    assert decided_in_python == []
    assert (job.scanned, job.mapped) == (120, 60)
    assert Usage.objects.filter(workspace=tenant.workspace, feature__key="target").count() == 60
    assert Event.objects.filter(workspace=tenant.workspace, status=EventStatus.MAPPED).count() == 60


def test_events_another_active_rule_also_matches_go_to_the_evaluator(
    tenant, django_capture_on_commit_callbacks, monkeypatch, settings
):
    """An older rule whose job has not run yet matches the same events: the evaluator counts
    them for both rules, and so must the SQL path (by leaving them to it)."""
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, [("Report Exported", {"plan": {"tier": "pro"}})] * 20)
    make_feature(tenant.workspace, "target")
    make_feature(tenant.workspace, "older")
    make_rule(tenant.workspace, "older", event="Report Exported", name="older")  # its job never runs here

    job = _create_and_run(
        tenant.workspace,
        django_capture_on_commit_callbacks,
        "Report Exported",
        [{"property": "plan.tier", "operator": "equals", "value": "pro"}],
        None,
        chunk_size=8,
    )

    assert (job.scanned, job.mapped) == (20, 20)
    assert Usage.objects.filter(workspace=tenant.workspace, feature__key="target").count() == 20
    assert Usage.objects.filter(workspace=tenant.workspace, feature__key="older").count() == 20
