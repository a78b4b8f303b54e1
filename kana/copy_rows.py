"""Bulk inserts with PostgreSQL COPY, for hot paths where the ORM's INSERT costs too much.

``bulk_create`` prepares every value through its field and psycopg then renders the
statement's arrays in Python: about 180 µs a row for an event. COPY takes the values as
they are. The callers keep the ORM path for SQLite and for small inserts.
"""

import re
from collections.abc import Iterable, Sequence
from contextlib import nullcontext

from django.db import connection


def next_ids(table: str, count: int) -> list[int]:
    """``count`` ids drawn from ``table``'s id sequence, in one query (PostgreSQL)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)", [table, count])
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


def copy_out(sql: str, params: Sequence = ()) -> list[bytes]:
    """``COPY (sql) TO STDOUT`` (PostgreSQL, text format): the rows as PostgreSQL sent them,
    one bytes per row, each ending in a newline, with backslash escapes (see
    ``unescape_copy_text``). Logged like any other query. The caller bounds the rows (a
    chunk): the whole result is read before returning, so no statement stays open while
    the caller's client is slow."""
    statement = f"COPY ({sql}) TO STDOUT"
    with connection.cursor() as cursor:
        log = cursor.debug_sql(statement, params) if hasattr(cursor, "debug_sql") else nullcontext()
        with log, connection.wrap_database_errors, cursor.cursor.copy(statement, params or None) as copy:
            return [bytes(data) for data in copy]


# COPY's text format writes these as backslash sequences (and never octal ones).
_COPY_ESCAPES = {b"\\": b"\\", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}
_COPY_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)


def unescape_copy_text(data: bytes) -> bytes:
    """One-column COPY text output back to the values it holds (the row ends stay newlines)."""
    if b"\\" not in data:
        return data
    return _COPY_ESCAPE.sub(lambda m: _COPY_ESCAPES[m.group(1)], data)
