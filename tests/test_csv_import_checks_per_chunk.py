"""An import's deferred foreign-key checks run a chunk at a time, while the import reports the
chunk, not all at COMMIT (``users.csv_import._ChecksPerChunk``): the same checks on the same
rows, so a reference that fails its check still fails the import and applies nothing."""

import pytest
from django.db import IntegrityError, connection
from django.test.utils import CaptureQueriesContext

from users import csv_import
from users.models import EndUser, ImportJob, ImportStatus, UserIdentity

from .conftest import requires_postgres
from .csv_helpers import csv_bytes, run_import

pytestmark = [requires_postgres]

CHUNK = 10
USERS = EndUser._meta.db_table


def new_users(count: int) -> bytes:
    return csv_bytes([{"user_id": f"u{n}", "email": f"u{n}@example.com"} for n in range(count)])


def checked_users(workspace_id: int) -> int:
    """The workspace's users row-locked in this transaction: what each identity's check
    (``SELECT 1 … FOR KEY SHARE``) leaves on its user; an unchecked new row has no ``xmax``."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {USERS} WHERE workspace_id = %s AND xmax::text <> '0'", [workspace_id])
        return cursor.fetchone()[0]


@pytest.mark.django_db
def test_each_chunks_checks_have_run_before_the_next_chunk_is_reported(tenant, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", CHUNK)
    seen = []

    def progress(processed: int, total: int) -> None:
        # Called after a chunk's writes and before its checks are sent.
        seen.append((processed, checked_users(tenant.workspace.pk)))

    job = run_import(tenant.workspace, new_users(3 * CHUNK), progress=progress)

    assert job.status == ImportStatus.DONE and job.applied
    assert job.counts()["created"] == 3 * CHUNK
    # By chunk k's report, the users of chunks 1 .. k-1 have been checked (deferred to COMMIT: none).
    assert seen == [(10, 0), (20, 10), (30, 20)]
    assert checked_users(tenant.workspace.pk) == 3 * CHUNK  # the last chunk's before the end


@pytest.mark.django_db(transaction=True)
def test_a_reference_failing_its_check_fails_the_import_and_applies_nothing(tenant, monkeypatch):
    """A user of the second chunk deleted under its identity (in the import's own transaction,
    from the progress callback): its identity's check fails, the import with it."""
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", CHUNK)
    workspace_id = tenant.workspace.pk

    def progress(processed: int, total: int) -> None:
        if processed == 2 * CHUNK:
            with connection.cursor() as cursor:
                cursor.execute(f"DELETE FROM {USERS} WHERE workspace_id = %s AND user_id = 'u15'", [workspace_id])

    with pytest.raises(IntegrityError):
        run_import(tenant.workspace, new_users(3 * CHUNK), progress=progress, run_inline=True)

    job = ImportJob.objects.get(workspace=tenant.workspace)
    assert job.status == ImportStatus.FAILED and not job.applied
    assert job.error_code == "import_failed"
    assert not EndUser.objects.filter(workspace=tenant.workspace).exists()
    assert not UserIdentity.objects.filter(workspace=tenant.workspace).exists()
    # The connection was left usable: the next import runs.
    assert run_import(tenant.workspace, new_users(CHUNK), run_inline=True).applied


@pytest.mark.django_db
def test_every_deferrable_constraint_is_initially_deferred():
    """``SET CONSTRAINTS ALL DEFERRED`` after each chunk's checks puts every constraint back as
    it started only while no deferrable constraint starts immediate."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint "
            "WHERE condeferrable AND NOT condeferred AND connamespace = 'public'::regnamespace"
        )
        assert cursor.fetchall() == []


@pytest.mark.django_db
def test_while_statements_are_logged_the_checks_are_sent_through_djangos_cursor(tenant, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", CHUNK)

    with CaptureQueriesContext(connection) as captured:
        job = run_import(tenant.workspace, new_users(2 * CHUNK))

    assert job.applied and job.counts()["created"] == 2 * CHUNK
    sent = [query["sql"] for query in captured.captured_queries if query["sql"].startswith("SET CONSTRAINTS")]
    assert sent == ["SET CONSTRAINTS ALL IMMEDIATE", "SET CONSTRAINTS ALL DEFERRED"] * 2


@pytest.mark.django_db
def test_a_dry_run_sends_no_checks(tenant, monkeypatch):
    """A dry run is rolled back: its checks would never run, so none are sent."""
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", CHUNK)

    with CaptureQueriesContext(connection) as captured:
        job = run_import(tenant.workspace, new_users(2 * CHUNK), dry_run=True)

    assert job.status == ImportStatus.DONE and not job.applied
    assert not [query for query in captured.captured_queries if query["sql"].startswith("SET CONSTRAINTS")]


def queued_trigger_event_bytes() -> int:
    """The memory of this transaction's queued trigger events (PostgreSQL's ``AfterTriggerEvents``
    context): each deferred check waits there until it runs and, once run, until it is freed."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(sum(total_bytes), 0) FROM pg_backend_memory_contexts WHERE name = 'AfterTriggerEvents'"
        )
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_the_checks_that_have_run_are_freed_so_a_chunks_checks_do_not_grow_with_the_import(tenant, monkeypatch):
    """Inside a savepoint PostgreSQL keeps every fired trigger event to the end of the
    transaction, and each chunk's ``SET CONSTRAINTS ALL IMMEDIATE`` walked all of them: the
    import's cost a row grew with the rows before it (21 µs a row of PostgreSQL at the start of
    a 1,000,000-row import, 53 at its end). The import runs at the top level, where they are
    freed as they run: what the queue holds stays about one chunk's checks."""
    rows = 1000
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", rows)
    held = []

    def progress(processed: int, total: int) -> None:
        held.append(queued_trigger_event_bytes())  # this chunk's checks queued, the earlier ones run

    job = run_import(tenant.workspace, new_users(8 * rows), progress=progress, run_inline=True)

    assert job.applied and job.counts()["created"] == 8 * rows
    assert len(held) == 8 and held[0] > 0
    # Kept to the end, the queue holds every chunk's checks: ≈ 4 × the second chunk's at the eighth.
    assert max(held) <= 2 * held[1], held
