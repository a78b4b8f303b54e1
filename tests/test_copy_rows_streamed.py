"""``kana.copy_rows.copy_text`` streams its rows: the server inserts the first pieces while the
caller still formats the rest (a CSV import's users: the server's inserts cost about four times
the formatting), and work given as ``while_finishing`` runs while the server inserts the tail.
A server error in any piece is still the caller's ``IntegrityError`` at the end."""

import time

import pytest
from django.db import IntegrityError, connection, connections, transaction

from kana.copy_rows import COPY_PIECE_ROWS, copy_text

from .conftest import requires_postgres

pytestmark = [pytest.mark.django_db, requires_postgres]

TABLE = "kana_test_copy_probe"
# About as wide as a user's row: libpq sends what it is given in multiples of 8 KB.
WIDE = "x" * 120


@pytest.fixture
def probe_table(db):
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TEMP TABLE {TABLE} (n integer PRIMARY KEY, note text NOT NULL)")
    yield TABLE


def _rows_copied_so_far(other, pid: int) -> int:
    """What the server reports it has inserted into the COPY that backend ``pid`` runs."""
    with other.cursor() as cursor:
        cursor.execute("SELECT tuples_processed FROM pg_stat_progress_copy WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row[0] if row else 0


def test_the_server_inserts_the_first_pieces_while_the_rest_are_formatted(probe_table):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    other = connections.create_connection("default")
    seen_while_formatting = []

    def lines():
        for n in range(4 * COPY_PIECE_ROWS):
            if n == 3 * COPY_PIECE_ROWS:
                # Three pieces formatted; the rest not yet. The server must have rows by now.
                deadline = time.monotonic() + 10
                copied = _rows_copied_so_far(other, pid)
                while copied == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                    copied = _rows_copied_so_far(other, pid)
                seen_while_formatting.append(copied)
            yield f"{n}\trow {n} {WIDE}\n"

    try:
        copy_text(probe_table, ["n", "note"], lines())
    finally:
        other.close()
    assert seen_while_formatting[0] >= COPY_PIECE_ROWS
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*), min(n), max(n) FROM {probe_table}")
        assert cursor.fetchone() == (4 * COPY_PIECE_ROWS, 0, 4 * COPY_PIECE_ROWS - 1)


def test_while_finishing_runs_after_the_last_piece_is_sent_and_its_result_is_returned(probe_table):
    formatted = []

    def lines():
        for n in range(2 * COPY_PIECE_ROWS + 7):
            formatted.append(n)
            yield f"{n}\trow {n}\n"

    result = copy_text(probe_table, ["n", "note"], lines(), while_finishing=lambda: len(formatted))
    assert result == 2 * COPY_PIECE_ROWS + 7
    assert copy_text(probe_table, ["n", "note"], ["-1\tmany\n-2\tlines\n"]) is None
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {probe_table}")
        assert cursor.fetchone() == (2 * COPY_PIECE_ROWS + 9,)


@pytest.mark.parametrize("duplicate_at", [1, 3 * COPY_PIECE_ROWS + 5])
def test_a_unique_violation_in_any_piece_is_an_integrity_error(probe_table, duplicate_at):
    # A violation in the first piece reaches the client while later pieces are still sent:
    # it must still surface as Django's IntegrityError (the import's retry understands it).
    lines = [f"{n}\trow {n}\n" for n in range(4 * COPY_PIECE_ROWS)]
    lines.insert(duplicate_at, "0\tagain\n")
    finished = []
    with pytest.raises(IntegrityError), transaction.atomic():
        copy_text(probe_table, ["n", "note"], iter(lines), while_finishing=lambda: finished.append(True))
    assert finished == [True]  # everything was sent; the error came at the end
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {probe_table}")
        assert cursor.fetchone() == (0,)
