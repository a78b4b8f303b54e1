"""A reprocessing chunk racing a merge or a user deletion that changes its events meanwhile.

The chunk's candidates are read without row locks; the flip's UPDATE takes them and
re-checks each row as it is then. These tests hold a merge (or a deletion) open after it
changed the events, run a chunk (it must wait for that change), then let the change commit:
every event is mapped once, and its usage carries the user the event has after the change.
PostgreSQL only: SQLite serialises its writers.
"""

import threading

import pytest
from django.db import connection, connections

from features import ledger
from features.models import Event, EventStatus, ReprocessingJob, Usage
from features.reprocessing import process_chunk
from kana.jobs import JobStatus
from tests.conftest import requires_postgres, wait_until
from tests.usage_support import make_feature, make_rule, make_user, store_unmapped_events
from users import merges
from users.merges import merge_users
from users.services import delete_user

pytestmark = requires_postgres

PRO = [{"property": "plan.tier", "operator": "equals", "value": "pro"}]
EVENTS = 40


def _backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def _is_blocked(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT cardinality(pg_blocking_pids(%s)) > 0", [pid])
        return cursor.fetchone()[0]


def _hold_open(monkeypatch, module, name: str):
    """Make ``<module>.<name>`` (a merge's or deletion's event move) pause after its writes,
    inside the caller's transaction, until the returned event is set."""
    changed, release = threading.Event(), threading.Event()
    original = getattr(module, name)

    def held(**kwargs):
        original(**kwargs)
        changed.set()
        release.wait(30)

    monkeypatch.setattr(module, name, held)
    return changed, release


def _run_chunk_while_held(job_pk: int, change, changed: threading.Event, release: threading.Event):
    """Start ``change`` in a thread, run a chunk once it has written (the chunk must wait for
    it), then let it commit. Returns the chunk's result."""
    errors = []

    def in_thread(target):
        def run():
            try:
                target()
            except Exception as error:  # surfaced by the test below
                errors.append(error)
            finally:
                connections.close_all()

        return threading.Thread(target=run)

    changer = in_thread(change)
    changer.start()
    assert changed.wait(30), "the change did not start"
    results, pids = [], []

    def run_chunk():
        pids.append(_backend_pid())
        results.append(process_chunk(job_pk, chunk_size=EVENTS * 2))

    chunk = in_thread(run_chunk)
    chunk.start()
    wait_until(lambda: bool(pids) and _is_blocked(pids[0]), timeout=30, message="the chunk waits for the change")
    release.set()
    changer.join(30)
    chunk.join(30)
    assert not errors and not changer.is_alive() and not chunk.is_alive()
    return results[0]


def _setup(tenant, monkeypatch):
    # The job's task is not sent: the test runs its chunk itself, in a thread.
    monkeypatch.setattr("kana.jobs.enqueue_on_commit", lambda *args, **kwargs: None)
    make_feature(tenant.workspace, "exports")
    return make_user(tenant.workspace, "absorbed")


def _pro_specs():
    return [("Report Exported", {"plan": {"tier": "pro"}, "n": i}) for i in range(EVENTS)]


def test_a_chunk_racing_a_merge_records_its_usage_for_the_survivor(transactional_db, tenant, monkeypatch):
    absorbed = _setup(tenant, monkeypatch)
    survivor = make_user(tenant.workspace, "survivor")
    store_unmapped_events(tenant.workspace, absorbed, _pro_specs())
    rule = make_rule(tenant.workspace, "exports", event="Report Exported", conditions=PRO)
    job = ReprocessingJob.objects.get(rule=rule)
    # The events' move travels in the merge's message (users.merges.absorb): held after it.
    changed, release = _hold_open(monkeypatch, merges, "absorb")

    def merge():
        merge_users(workspace=tenant.workspace, user_pks=[absorbed.pk, survivor.pk], survivor_pk=survivor.pk)

    result = _run_chunk_while_held(job.pk, merge, changed, release)

    assert (result.scanned, result.mapped, result.finished) == (EVENTS, EVENTS, True)
    events = Event.objects.filter(workspace=tenant.workspace)
    assert set(events.values_list("status", "user_id")) == {(EventStatus.MAPPED, survivor.pk)}
    usage = Usage.objects.filter(workspace=tenant.workspace)
    assert usage.count() == EVENTS and set(usage.values_list("user_id", flat=True)) == {survivor.pk}
    job.refresh_from_db()
    assert (job.status, job.scanned, job.mapped) == (JobStatus.DONE, EVENTS, EVENTS)


@pytest.mark.parametrize("keep", [True, False], ids=["events-kept", "events-deleted"])
def test_a_chunk_racing_a_user_deletion_maps_what_is_left_once(transactional_db, tenant, monkeypatch, keep):
    user = _setup(tenant, monkeypatch)
    store_unmapped_events(tenant.workspace, user, _pro_specs())
    rule = make_rule(tenant.workspace, "exports", event="Report Exported", conditions=PRO)
    job = ReprocessingJob.objects.get(rule=rule)
    changed, release = _hold_open(monkeypatch, ledger, "forget_user")

    def delete():
        delete_user(workspace=tenant.workspace, user_pk=user.pk, events="keep" if keep else "delete")

    result = _run_chunk_while_held(job.pk, delete, changed, release)

    events = Event.objects.filter(workspace=tenant.workspace)
    usage = Usage.objects.filter(workspace=tenant.workspace)
    if keep:
        # Detached by the deletion before the flip: mapped once, counted without a user.
        assert result.mapped == EVENTS
        assert set(events.values_list("status", "user_id")) == {(EventStatus.MAPPED, None)}
        assert usage.count() == EVENTS and set(usage.values_list("user_id", flat=True)) == {None}
    else:
        assert result.mapped == 0 and not events.exists() and not usage.exists()
