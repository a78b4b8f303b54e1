"""Bulk inserts with PostgreSQL COPY, for hot paths where the ORM's INSERT costs too much.

``bulk_create`` prepares every value through its field and psycopg then renders the
statement's arrays in Python: about 180 µs a row for an event. COPY takes the values as
they are, and in its binary format the server parses none of them. The callers keep the
ORM path for SQLite and for small inserts.
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext

from django.db import connection


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


def copy_binary(table: str, columns: Sequence[str], types: Sequence[str], rows: Iterable[Sequence]) -> None:
    """COPY ``rows`` of Python values into ``table`` in COPY's binary format (PostgreSQL).

    ``types``: each column's PostgreSQL type (``"int8"``, ``"text"``, ``"timestamptz"``,
    ``"jsonb"`` …), exactly the column's (an ``int4`` column takes no ``int8`` value), which
    picks psycopg's binary dumper (in C) for each value. The server then reads every value as
    it is stored instead of parsing text, and nothing is escaped here; in a CSV import, whose
    COPYs are mostly index inserts, that costs the same as text did (docs/performance-history.md,
    "Round 18"). Rows are sent as psycopg's buffer fills, so the server inserts the first ones
    while the rest are dumped (every 32 KiB: for users, every ≈ 250 rows). Logged and wrapped
    like any other query: a unique violation is Django's ``IntegrityError``, which the engine's
    retry understands.
    """
    sql = f"COPY {connection.ops.quote_name(table)} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
    with connection.cursor() as cursor:
        log = cursor.debug_sql(sql) if hasattr(cursor, "debug_sql") else nullcontext()
        with log, connection.wrap_database_errors, cursor.cursor.copy(sql) as copy:
            copy.set_types(types)
            write_row = copy.write_row
            for row in rows:
                write_row(row)


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
