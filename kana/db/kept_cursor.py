"""A hot path's statement run on a psycopg cursor kept per connection, past Django's wrappers.

Each ``connection.cursor()`` costs a track or an entitlement check more Python than its
statement's own client work: the connection looked up through asgiref's ``Local`` on every
attribute of Django's ``connection`` proxy, the ``async_unsafe`` check, a new psycopg cursor
(its adapters and transformer), Django's time zone check of it, the ``CursorWrapper`` and its
execute wrappers (docs/performance.md, "Round 12: leancpu"). ``rows`` does what Django's
cursor does that matters, once per statement, on one psycopg cursor made once per connection
by Django's own ``create_cursor``:

- the connection's health check and opening (``close_if_health_check_failed``,
  ``ensure_connection``), the thread-sharing and broken-transaction checks;
- errors raised as Django's (``wrap_database_errors``: ``OperationalError``,
  ``IntegrityError``…, and ``errors_occurred`` set for the end of the request's check).

Whenever Django records or wraps statements (``queries_logged``: ``DEBUG``, the test suite's
query counts; ``execute_wrappers``: instrumentation), the statement goes through Django's
cursor as before, so it is logged and counted exactly as any other. Off PostgreSQL too.
"""

import weakref

from django.db import DEFAULT_DB_ALIAS, connections

# psycopg connection -> (the kept cursor, the time zone it was made for).
_kept: "weakref.WeakKeyDictionary[object, tuple[object, object]]" = weakref.WeakKeyDictionary()


def rows(sql: str, params, *, result: int = 0) -> list[tuple]:
    """The rows of statement ``result`` (0: the first) of ``sql`` (one or more statements in
    one message) run with ``params``, on the default database, in the caller's transaction."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.queries_logged or db.execute_wrappers or db.vendor != "postgresql":
        with db.cursor() as cursor:
            return _fetch(cursor, sql, params, result)
    db.close_if_health_check_failed()
    db.ensure_connection()
    db.validate_thread_sharing()
    db.validate_no_broken_transaction()
    with db.wrap_database_errors:
        raw = db.connection
        kept = _kept.get(raw)
        if kept is None or kept[1] != db.timezone or kept[0].closed:
            kept = _kept[raw] = (db.create_cursor(), db.timezone)
        return _fetch(kept[0], sql, params, result)


def _fetch(cursor, sql: str, params, result: int) -> list[tuple]:
    cursor.execute(sql, params)
    for _ in range(result):
        cursor.nextset()
    return cursor.fetchall()
