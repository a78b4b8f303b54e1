"""A CSV import formats each chunk's report while PostgreSQL inserts the chunk's last rows:
``apply_profile_rows(while_writing=)`` runs the caller's work once the created users have
their ids and before the identities' COPY has ended, and returns its result with the
outcomes. The report itself is the same (tests/test_csv_import.py and the create-only and
pipeline tests hold its content)."""

import csv
import io

import pytest
from django.db import connection, connections

from users import services
from users.csv_import import open_import_report
from users.identity import IdentifyResult
from users.profile import validated_changes
from users.services import ProfileRow

from .conftest import requires_postgres
from .csv_helpers import T0, identify, run_import

pytestmark = pytest.mark.django_db


def _rows(count: int, prefix: str = "new") -> list[ProfileRow]:
    return [
        ProfileRow(
            changes=validated_changes(name=f"User {i}", email=f"{prefix}{i}@example.com")[0],
            user_id=f"{prefix}-{i}",
            label=f"row {i + 2}",
        )
        for i in range(count)
    ]


def _copy_in_progress(other, pid: int) -> str | None:
    """The table backend ``pid`` is copying into right now, as seen from another connection."""
    with other.cursor() as cursor:
        cursor.execute("SELECT relid::regclass::text FROM pg_stat_progress_copy WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row[0] if row else None


@requires_postgres
def test_while_writing_runs_during_the_identities_copy_with_the_users_ids_drawn(tenant):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    other = connections.create_connection("default")
    seen = {}

    def while_writing(outcomes):
        seen["copying"] = _copy_in_progress(other, pid)
        seen["ids"] = [outcome.user.pk for outcome in outcomes]
        return "formatted"

    try:
        outcomes, written = services.apply_profile_rows(
            workspace=tenant.workspace, rows=_rows(50), occurred_at=T0, touched={}, while_writing=while_writing
        )
    finally:
        other.close()
    assert written == "formatted"
    assert seen["copying"] == "users_useridentity"
    assert all(pk is not None for pk in seen["ids"])
    assert seen["ids"] == [outcome.user.pk for outcome in outcomes]
    assert [outcome.outcome for outcome in outcomes] == ["created"] * 50


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_while_writing_gets_the_outcomes_without_it_and_its_result_is_returned(tenant, one_at_a_time):
    identify(tenant.workspace, "old", name="Old", at=T0)
    rows = [
        *_rows(10),
        ProfileRow(changes=validated_changes(name="Renamed")[0], user_id="old", label="row 12"),
        ProfileRow(changes=validated_changes(name="Twice")[0], user_id="old", label="row 13"),
    ]
    calls = []

    def while_writing(outcomes):
        calls.append(list(outcomes))
        return len(outcomes)

    outcomes, written = services.apply_profile_rows(
        workspace=tenant.workspace,
        rows=rows,
        occurred_at=T0,
        touched={},
        one_at_a_time=one_at_a_time,
        while_writing=while_writing,
    )
    assert written == 12
    assert calls == [outcomes]
    kinds = [o.outcome if isinstance(o, IdentifyResult) else o.code for o in outcomes]
    assert kinds == ["created"] * 10 + ["updated", "duplicate_row"]


def test_without_while_writing_the_outcomes_alone_are_returned(tenant):
    outcomes = services.apply_profile_rows(workspace=tenant.workspace, rows=_rows(3), occurred_at=T0, touched={})
    assert [outcome.outcome for outcome in outcomes] == ["created"] * 3


def test_a_report_over_several_chunks_keeps_file_order_errors_and_sample_bounds(tenant, monkeypatch):
    """Chunks of 7 rows, some whole-chunk errors (nothing to apply) among applied chunks: the
    report lists every row once, in file order, and the sample keeps errors first."""
    from users import csv_import

    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 7)
    monkeypatch.setattr(csv_import, "REPORT_SAMPLE_ROWS", 5)
    lines = ["user_id,name,email"]
    for i in range(40):
        if 14 <= i < 21:  # the third chunk: errors only
            lines.append(f"u{i},N")  # two fields of three
        else:
            lines.append(f"u{i},Name {i},n{i}@example.com")
    job = run_import(tenant.workspace, ("\n".join(lines) + "\n").encode(), dry_run=True)
    with open_import_report(job) as report:
        rows = list(csv.reader(io.TextIOWrapper(report, encoding="utf-8", newline="")))[1:]
    assert [row[0] for row in rows] == [str(n) for n in range(2, 42)]
    assert [row[1] for row in rows] == ["created"] * 14 + ["error"] * 7 + ["created"] * 19
    assert job.counts()["created"] == 33 and job.counts()["error"] == 7
    assert [(row["row"], row["result"]) for row in job.sample] == [(n, "error") for n in range(16, 21)]
