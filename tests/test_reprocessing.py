"""Retroactive reprocessing: exact counts, bounded queries, and exactness under concurrency.

In-process tests run the job at commit (``tasks_in_process``); the ``celery_worker`` tests
run it in a real worker process on PostgreSQL + Redis.
"""

import threading
import time

import pytest
from django.conf import settings
from django.db import connection, connections, transaction

from features.models import Event, EventStatus, ReprocessingJob, Usage
from features.reprocessing import process_chunk
from kana.jobs import JobStatus
from tests.conftest import SegmentClient, requires_broker, requires_postgres, wait_until
from tests.usage_support import T0, make_feature, make_rule, make_user, store_unmapped_events, usage_count


def _waiting_advisory_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        return cursor.fetchone()[0]


@requires_postgres
def test_an_event_waiting_on_rule_creation_is_mapped_with_the_new_rule(
    transactional_db, tenant, tasks_in_process, ingest_route
):
    make_feature(tenant.workspace, "reports")
    segment = SegmentClient(tenant)
    # Warm this process's rule cache at the version before the rule.
    assert segment.track("u1", "Report Exported").json()["status"] == "unmapped"
    results = {}

    def send_during_creation():
        try:
            results["response"] = SegmentClient(tenant).track("u1", "Report Exported", messageId="during")
        finally:
            connections.close_all()

    with transaction.atomic():
        make_rule(tenant.workspace, "reports", event="Report Exported")
        sender = threading.Thread(target=send_during_creation)
        sender.start()
        # The ingest transaction is now queued behind the rule's exclusive lock.
        wait_until(lambda: _waiting_advisory_locks() == 1, timeout=10, message="ingest waiting on the rules lock")
    sender.join(timeout=30)

    assert results["response"].json()["status"] == "mapped"
    during = Event.objects.get(workspace=tenant.workspace, message_id="during")
    assert during.status == EventStatus.MAPPED
    assert Usage.objects.filter(event=during).count() == 1
    # The warm-up event was stored before the rule: reprocessing mapped it.
    assert usage_count(tenant.workspace, "reports") == 2


def _specs(count: int, *, every: int = 2) -> list[tuple[str, dict]]:
    """Report Exported events; every ``every``-th one is on the pro plan (what the rule wants)."""
    return [("Report Exported", {"plan": {"tier": "pro" if i % every == 0 else "free"}, "n": i}) for i in range(count)]


PRO = [{"property": "plan.tier", "operator": "equals", "value": "pro"}]


@pytest.mark.usefixtures("tasks_in_process")
def test_a_job_walks_every_chunk_and_counts_exactly(tenant, settings, django_capture_on_commit_callbacks):
    settings.KANA_REPROCESS_CHUNK_SIZE = 7
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, _specs(50, every=3))
    store_unmapped_events(tenant.workspace, user, [("Other", {"plan": {"tier": "pro"}})] * 5, prefix="other")
    make_feature(tenant.workspace, "pro-exports")
    with django_capture_on_commit_callbacks(execute=True):
        rule = make_rule(tenant.workspace, "pro-exports", conditions=PRO)
    job = ReprocessingJob.objects.get(rule=rule)
    assert (job.status, job.scanned, job.mapped) == (JobStatus.DONE, 55, 17 + 5)
    assert job.cursor == job.last_event_id and job.finished_at is not None
    assert usage_count(tenant.workspace, "pro-exports") == 22
    assert Event.objects.filter(workspace=tenant.workspace, status=EventStatus.UNMAPPED).count() == 33


def test_a_finished_job_does_nothing_more(tenant, django_capture_on_commit_callbacks, tasks_in_process):
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, _specs(4))
    make_feature(tenant.workspace, "pro-exports")
    with django_capture_on_commit_callbacks(execute=True):
        rule = make_rule(tenant.workspace, "pro-exports", conditions=PRO)
    job = ReprocessingJob.objects.get(rule=rule)
    assert process_chunk(job.pk).scanned == 0
    job.refresh_from_db()
    assert (job.status, job.scanned, job.mapped) == (JobStatus.DONE, 4, 2)


@pytest.mark.skipif(
    "sqlite" in settings.DATABASES["default"]["ENGINE"],
    reason="SQLite splits bulk inserts every 999 parameters; the bound is PostgreSQL's",
)
def test_one_chunk_runs_a_fixed_number_of_queries_whatever_its_size(tenant, django_assert_max_num_queries):
    user = make_user(tenant.workspace, "u1")
    make_feature(tenant.workspace, "pro-exports")
    make_feature(tenant.workspace, "exports")
    store_unmapped_events(tenant.workspace, user, _specs(600))
    # Enqueued on commit, which never comes under the db fixture: the test runs the chunks.
    make_rule(tenant.workspace, "exports", event="Report Exported", name="all")
    rule = make_rule(tenant.workspace, "pro-exports", conditions=PRO)
    job = ReprocessingJob.objects.get(rule=rule)
    # Eleven at most: two of them load the rules, only when their version moved. The "all"
    # rule also matches these events (its job never ran), so SQL leaves them to the
    # evaluator: the deciding statement, then the evaluator's read of the rows left.
    with django_assert_max_num_queries(11):
        assert process_chunk(job.pk, chunk_size=10).mapped == 10
    with django_assert_max_num_queries(11):
        assert process_chunk(job.pk, chunk_size=500).mapped == 500
    job.refresh_from_db()
    assert (job.scanned, job.mapped, job.status) == (510, 510, JobStatus.QUEUED)  # not claimed, not finished
    assert usage_count(tenant.workspace, "pro-exports") == 255 and usage_count(tenant.workspace, "exports") == 510


# --- with a real worker ------------------------------------------------------------------


def _job_of(rule) -> ReprocessingJob:
    return ReprocessingJob.objects.filter(rule=rule).latest("pk")


def _wait_done(rule, timeout: float = 90) -> ReprocessingJob:
    wait_until(lambda: _job_of(rule).status == JobStatus.DONE, timeout=timeout, message="reprocessing done")
    return _job_of(rule)


@requires_broker
def test_a_worker_reprocesses_to_done_with_exact_counts(celery_worker, tenant):
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, _specs(3000, every=4))
    store_unmapped_events(tenant.workspace, user, [("Other", {})] * 100, prefix="other")
    make_feature(tenant.workspace, "pro-exports")
    rule = make_rule(tenant.workspace, "pro-exports", event="Report Exported", conditions=PRO)
    job = _wait_done(rule)
    assert (job.scanned, job.mapped) == (3000, 750), celery_worker.output()[-3000:]
    assert usage_count(tenant.workspace, "pro-exports") == 750
    assert Usage.objects.filter(rule=rule, occurred_at__lt=T0).count() == 0


@requires_broker
def test_replays_during_and_after_reprocessing_never_double_count(celery_worker, tenant):
    segment = SegmentClient(tenant)
    stored = [
        {"type": "track", "userId": f"u{i % 5}", "event": "Report Exported", "messageId": f"m{i}", "properties": p}
        for i, (_name, p) in enumerate(_specs(1000))
    ]
    for start in range(0, len(stored), 250):
        assert segment.batch(stored[start : start + 250]).json()["accepted"] == 250
    make_feature(tenant.workspace, "pro-exports")
    rule = make_rule(tenant.workspace, "pro-exports", conditions=PRO)
    # Replay everything while the worker maps it, then again once it is done.
    for start in range(0, len(stored), 250):
        assert segment.batch(stored[start : start + 250]).json()["duplicates"] == 250
    job = _wait_done(rule)
    for start in range(0, len(stored), 250):
        assert segment.batch(stored[start : start + 250]).json()["duplicates"] == 250
    assert segment.track("u1", "Report Exported", {"plan": {"tier": "pro"}}, messageId="m0").json()["status"] == (
        "duplicate"
    )
    assert (job.scanned, job.mapped) == (1000, 500)
    assert usage_count(tenant.workspace, "pro-exports") == 500
    assert Event.objects.filter(workspace=tenant.workspace).count() == 1000


@requires_broker
def test_events_ingested_while_a_rule_is_created_count_exactly_once(celery_worker, tenant):
    user = make_user(tenant.workspace, "u0")
    store_unmapped_events(tenant.workspace, user, _specs(2000))
    make_feature(tenant.workspace, "pro-exports")
    stop = threading.Event()
    sent = []
    errors = []

    def sender(index: int):
        client = SegmentClient(tenant)
        n = 0
        try:
            while not stop.is_set() or n < 20:
                tier = "pro" if n % 2 == 0 else "free"
                body = {"plan": {"tier": tier}}
                response = client.track(f"t{index}", "Report Exported", body, messageId=f"t{index}-{n}")
                if response.status_code != 200:
                    errors.append(response.content)
                sent.append(tier)
                n += 1
        finally:
            connections.close_all()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    rule = make_rule(tenant.workspace, "pro-exports", conditions=PRO)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    job = _wait_done(rule)

    matching = Event.objects.filter(workspace=tenant.workspace, payload__properties__plan__tier="pro")
    assert matching.count() == 1000 + sent.count("pro")
    # Every matching event counted once: none missed, none twice.
    assert usage_count(tenant.workspace, "pro-exports") == matching.count()
    assert not matching.exclude(status=EventStatus.MAPPED).exists()
    assert Usage.objects.filter(feature__key="pro-exports").values("event").distinct().count() == matching.count()
    # The job covered what was stored before the rule; ingest mapped the rest.
    assert job.mapped == matching.filter(id__lte=job.last_event_id).count()
    assert matching.filter(id__gt=job.last_event_id).exists()
