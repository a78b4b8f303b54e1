"""Bulk inserts with PostgreSQL COPY, for hot paths where the ORM's INSERT costs too much.

``bulk_create`` prepares every value through its field and psycopg then renders the
statement's arrays in Python: about 180 µs a row for an event. COPY takes the values as
they are. The callers keep the ORM path for SQLite and for small inserts.
"""

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from itertools import islice
from typing import TypeVar

from django.db import connection

T = TypeVar("T")


def next_ids(table: str, count: int) -> list[int]:
    """``count`` ids drawn from ``table``'s id sequence, in one query (PostgreSQL).

    The sequence is looked up once (a sub-select, run as an init plan): as ``nextval``'s
    argument written inline, ``pg_get_serial_sequence`` and the text-to-regclass lookup ran
    for every id, 8-10 µs each, ten times ``nextval`` itself (0.7-0.8 ms per 1,000 ids).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nextval((SELECT pg_get_serial_sequence(%s, 'id')::regclass)) FROM generate_series(1, %s)",
            [table, count],
        )
        return [pk for (pk,) in cursor.fetchall()]


def copy_rows(table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    """COPY ``rows`` into ``table`` (PostgreSQL). Values go as text: JSON already encoded.

    Database errors surface as Django's (a unique violation is an ``IntegrityError``, which
    the ingest retry understands), and the statement is logged like any other query, so
    query-count tests and debug tooling still see it.
    """
    sql = f"COPY {connection.ops.quote_name(table)} ({', '.join(columns)}) FROM STDIN"
    with connection.cursor() as cursor:
        log = cursor.debug_sql(sql) if hasattr(cursor, "debug_sql") else nullcontext()
        with log, connection.wrap_database_errors, cursor.cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)


# Rows per piece of a streamed COPY: about 16-32 KB of text for a user's row, so the
# server starts inserting the first rows while the rest are still being formatted.
COPY_PIECE_ROWS = 200


def copy_text(
    table: str, columns: Sequence[str], lines: Iterable[str], *, while_finishing: Callable[[], T] | None = None
) -> T | None:
    """COPY rows already written in COPY's text format (PostgreSQL): one line per row, each
    ending in a newline, values tab-separated and escaped (``copy_text_value``), NULL as ``\\N``;
    an item of ``lines`` may also be several whole lines.

    For callers that format their rows faster than psycopg's per-value dumpers (a datetime
    costs ~2 µs there; a row of 14 values ~11 µs). Logged and wrapped like ``copy_rows``.

    The lines are sent in pieces of ``COPY_PIECE_ROWS`` as they are formatted: the server
    inserts (heap and indexes, ~4 times the formatting's cost for a user) the rows already
    sent while this process formats the next ones, instead of waiting for the whole text.
    ``while_finishing``, if given, runs after the last piece is sent and before the COPY's
    end is awaited (the server still inserting the tail): its result is returned. An error
    of the server (a unique violation) is raised at the end, as for one piece.
    """
    sql = f"COPY {connection.ops.quote_name(table)} ({', '.join(columns)}) FROM STDIN"
    result = None
    lines = iter(lines)
    with connection.cursor() as cursor:
        log = cursor.debug_sql(sql) if hasattr(cursor, "debug_sql") else nullcontext()
        with log, connection.wrap_database_errors, cursor.cursor.copy(sql) as copy:
            while piece := list(islice(lines, COPY_PIECE_ROWS)):
                copy.write("".join(piece).encode())
            if while_finishing is not None:
                result = while_finishing()
    return result


_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text_value(value: str) -> str:
    """A string as a value of COPY's text format: backslash, tab, newline and CR escaped."""
    return value.translate(_COPY_ESCAPES) if _COPY_SPECIAL.search(value) else value


def copy_out_csv(sql: str, params: Sequence = ()) -> list[bytes]:
    """``COPY (sql) TO STDOUT (FORMAT csv)`` (PostgreSQL): the rows as PostgreSQL wrote them,
    one bytes per row, each ending in a line feed (NULL is an empty unquoted cell, an empty
    string ``""``). Logged like any other query. The caller bounds the rows (a chunk): the
    result is read whole before returning, so no statement stays open while a slow client
    reads."""
    statement = f"COPY ({sql}) TO STDOUT (FORMAT csv)"
    with connection.cursor() as cursor:
        log = cursor.debug_sql(statement, params) if hasattr(cursor, "debug_sql") else nullcontext()
        with log, connection.wrap_database_errors, cursor.cursor.copy(statement, params or None) as copy:
            return [bytes(data) for data in copy]


def stream_copy_out_csv(sql: str, params: Sequence = ()) -> Iterator[bytes]:
    """``copy_out_csv`` as a stream, one bytes per row: for a caller that writes locally as
    it reads (a command writing a file), never for an HTTP response, since the statement and
    the connection stay busy until the last row is read."""
    statement = f"COPY ({sql}) TO STDOUT (FORMAT csv)"
    with connection.cursor() as cursor:
        log = cursor.debug_sql(statement, params) if hasattr(cursor, "debug_sql") else nullcontext()
        with log, connection.wrap_database_errors, cursor.cursor.copy(statement, params or None) as copy:
            yield from copy
