"""``kana.copy_rows.copy_binary``: rows of Python values in COPY's binary format. Every kind of
value a user's or an identity's row has arrives as it was (the server parses no text, so
nothing is escaped); the server inserts the first rows while the rest are still dumped; a
server error in any row is the caller's ``IntegrityError`` at the end; the statement is
logged like any other query."""

import json
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.db import IntegrityError, connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from kana.copy_rows import copy_binary

from .conftest import requires_postgres

pytestmark = [pytest.mark.django_db, requires_postgres]

TABLE = "kana_test_copy_probe"
COLUMNS = ["n", "small", "note", "label", "at", "doc", "flag"]
TYPES = ["int8", "int4", "text", "text", "timestamptz", "jsonb", "bool"]
# About as wide as a user's row.
WIDE = "x" * 120


@pytest.fixture
def probe_table(db):
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE {TABLE} (n bigint PRIMARY KEY, small integer, note text NOT NULL, "
            "label varchar(40), at timestamptz, doc jsonb, flag boolean)"
        )
    yield TABLE


def _stored(table: str) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(COLUMNS)} FROM {table} ORDER BY n")
        # Django reads jsonb as its text.
        return [(*row[:5], None if row[5] is None else json.loads(row[5]), row[6]) for row in cursor.fetchall()]


def test_every_kind_of_value_is_stored_as_it_was_given(probe_table):
    at = datetime(2026, 12, 4, 10, 30, 15, 123456, tzinfo=UTC)
    rows = [
        # What COPY's text format escapes: tab, newline, CR, backslash; and "\N", its NULL.
        (1, 7, "tab\there\nnew line\r\\back\\slash", "\\N", at, {}, True),
        (2, -(2**31), "ünïcødé 🙂 ‮rtl", "", at - timedelta(days=40_000), {"a": [1, "two", None], "b": 1.5}, False),
        # NULL wherever a column allows it; the largest bigint.
        (2**63 - 1, None, "", None, None, None, None),
        # A time in another zone is the same instant.
        (4, 2**31 - 1, WIDE, "label", datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=-5))), [], None),
    ]
    copy_binary(probe_table, COLUMNS, TYPES, rows)

    stored = _stored(probe_table)
    assert stored == [rows[0], rows[1], rows[3], rows[2]]
    assert stored[2][4] == datetime(2026, 1, 1, 17, tzinfo=UTC)


def test_the_server_inserts_the_first_rows_while_the_rest_are_dumped(probe_table):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    other = connections.create_connection("default")
    seen_while_dumping = []

    def copied_so_far() -> int:
        with other.cursor() as cursor:
            cursor.execute("SELECT tuples_processed FROM pg_stat_progress_copy WHERE pid = %s", [pid])
            row = cursor.fetchone()
        return row[0] if row else 0

    def rows():
        for n in range(2_000):
            if n == 1_500:
                # ≈ 200 KB dumped, 500 rows not yet: the server must have rows by now.
                deadline = time.monotonic() + 10
                copied = copied_so_far()
                while copied == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                    copied = copied_so_far()
                seen_while_dumping.append(copied)
            yield (n, n, f"row {n} {WIDE}", None, None, None, None)

    try:
        copy_binary(probe_table, COLUMNS, TYPES, rows())
    finally:
        other.close()
    assert 0 < seen_while_dumping[0] < 2_000
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*), min(n), max(n) FROM {probe_table}")
        assert cursor.fetchone() == (2_000, 0, 1_999)


@pytest.mark.parametrize("duplicate_at", [1, 1_505])
def test_a_unique_violation_in_any_row_is_an_integrity_error(probe_table, duplicate_at):
    # A violation in the first buffer reaches the client while later rows are still sent: it
    # must still surface as Django's IntegrityError (the import's retry understands it).
    rows = [(n, None, f"row {n} {WIDE}", None, None, None, None) for n in range(2_000)]
    rows.insert(duplicate_at, (0, None, "again", None, None, None, None))
    with pytest.raises(IntegrityError), transaction.atomic():
        copy_binary(probe_table, COLUMNS, TYPES, iter(rows))
    assert _stored(probe_table) == []


def test_the_copy_is_logged_like_any_other_query(probe_table):
    with CaptureQueriesContext(connection) as queries:
        copy_binary(probe_table, ["n", "note"], ["int8", "text"], [(1, "one")])
    assert [q["sql"] for q in queries] == [f'COPY "{probe_table}" (n, note) FROM STDIN (FORMAT BINARY)']
