"""A hot path's statement run on a psycopg cursor kept per connection, past Django's wrappers.

Each ``connection.cursor()`` costs a track or an entitlement check more Python than its
statement's own client work: the connection looked up through asgiref's ``Local`` on every
attribute of Django's ``connection`` proxy, the ``async_unsafe`` check, a new psycopg cursor
(its adapters and transformer), Django's time zone check of it, the ``CursorWrapper`` and its
execute wrappers (docs/performance-history.md, "Round 12: leancpu"). ``rows`` does what Django's
cursor does that matters, once per statement, on one psycopg cursor made once per connection
by Django's own ``create_cursor``:

- the connection's health check and opening (``close_if_health_check_failed``,
  ``ensure_connection``), the thread-sharing and broken-transaction checks;
- errors raised as Django's (``wrap_database_errors``: ``OperationalError``,
  ``IntegrityError``…, and ``errors_occurred`` set for the end of the request's check).

Whenever Django records or wraps statements (``queries_logged``: ``DEBUG``, the test suite's
query counts; ``execute_wrappers``: instrumentation), the statement goes through Django's
cursor as before, so it is logged and counted exactly as any other. Off PostgreSQL too.

``prepared_rows`` runs one prepared statement (``kana.db.prepared``) the same way, its values
bound server-side rather than formatted by psycopg into an ``EXECUTE`` text; ``message_rows``
the statements of one round trip (a single track's ``BEGIN``, lock and read; its insert and
``COMMIT``) as one libpq pipeline, its prepared statements' values bound the same way.
"""

import functools
import weakref
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import NamedTuple

from django.db import DEFAULT_DB_ALIAS, connections
from psycopg import errors, generators, pq
from psycopg.adapt import Transformer
from psycopg.types.json import Json, Jsonb
from psycopg.types.numeric import Int2, Int4, Int8

from . import prepared

# psycopg connection -> (the kept cursor, the time zone it was made for, the loaders of the
# rows it reads past psycopg's cursor: a ``Transformer`` of the cursor's adapters).
_kept: "weakref.WeakKeyDictionary[object, tuple[object, object, Transformer]]" = weakref.WeakKeyDictionary()
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_PIPELINE_ABORTED = pq.ExecStatus.PIPELINE_ABORTED
_IDLE = pq.TransactionStatus.IDLE


def rows(sql: str, params, *, result: int = 0) -> list[tuple]:
    """The rows of statement ``result`` (0: the first) of ``sql`` (one or more statements in
    one message) run with ``params``, on the default database, in the caller's transaction."""
    return _on_a_cursor(_fetch, sql, params, result)


def _on_a_cursor(fetch, sql: str, params, which):
    """``fetch(cursor, sql, params, which)`` on the kept cursor, or on Django's while Django
    logs or wraps statements (or the database is not PostgreSQL)."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.queries_logged or db.execute_wrappers or db.vendor != "postgresql":
        with db.cursor() as cursor:
            return fetch(cursor, sql, params, which)
    _checked(db)
    with db.wrap_database_errors:
        return fetch(_cursor(db), sql, params, which)


def prepared_rows(sql: str, params: dict) -> list[tuple]:
    """The rows of one statement ``sql`` (named parameters), prepared on the connection
    (``kana.db.prepared``) and run with its values bound server-side: sent as text in the
    protocol's Bind message, each read by PostgreSQL's input function of the parameter's type
    as PREPARE inferred it, instead of formatted by psycopg into an ``EXECUTE name(…)`` text
    (≈ 11 % of an entitlement check's CPU: docs/performance-history.md, "Round 13: s6lat"). The same
    prepared statement and plan either way, so the same rows.

    Sent as ``rows(prepared.statement(sql), params)`` instead (Django's cursor, or the kept one
    with ``EXECUTE`` text) whenever that path has something to do that this one does not:
    statements logged or wrapped, not PostgreSQL, nothing prepared, a transaction psycopg has
    yet to BEGIN, or a value whose text form this module does not write."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.queries_logged or db.execute_wrappers or db.vendor != "postgresql":
        return rows(prepared.statement(sql), params)
    found = prepared.bound(sql, db=db)  # prepares it first when needed
    values = None if found is None else _texts(params, found[1])
    if values is None:
        return rows(prepared.statement(sql) if found is not None else sql, params)
    _checked(db)
    raw = db.connection
    if not raw.autocommit and raw.pgconn.transaction_status == _IDLE:
        # psycopg sends the BEGIN of Django's atomic with the transaction's first statement.
        return rows(prepared.statement(sql), params)
    with db.wrap_database_errors:
        loader = _loader(db)
        with raw.lock:
            raw.pgconn.send_query_prepared(found[0].encode(), values)
            (result,) = raw.wait(generators.execute(raw.pgconn))
        if result.status != _TUPLES_OK:
            raise errors.error_from_result(result, encoding="utf-8")  # Django's client_encoding
        return _loaded(loader, result)


class Statement(NamedTuple):
    """One statement of ``message_rows``, with its positional (``%s``) or named (``%(name)s``,
    a dict) parameters: prepared on the connection when ``prepare`` (``kana.db.prepared``;
    again every ``replan_every`` uses when given), else sent with its text."""

    sql: str
    params: list | tuple | dict = ()
    prepare: bool = False
    replan_every: int | None = None


def message_rows(statements: list[Statement], *, result: int = 0) -> list[tuple]:
    """The rows of statement ``result`` of ``statements``, run in order in one round trip, on
    the default database, in the caller's transaction (a ``BEGIN`` among them opens it, a
    ``COMMIT`` ends it).

    Sent as one pipeline (libpq's pipeline mode: each statement's Bind and Execute, then one
    Sync), every prepared statement's values bound server-side as ``prepared_rows`` binds
    them: no ``EXECUTE name(…)`` text for psycopg to format and PostgreSQL to parse. The
    statements run one after the other, each with its own snapshot, as in one
    multi-statement message; a failed one skips the rest (a ``COMMIT`` after it too) and
    leaves the transaction aborted, for the caller's ``ROLLBACK``, as in one message.

    Sent as that one message instead (``rows`` of the ``EXECUTE`` texts joined) whenever
    ``prepared_rows`` would fall back: statements logged or wrapped, not PostgreSQL, nothing
    prepared, a transaction psycopg has yet to BEGIN, or a value whose text form
    ``_texts`` does not write."""
    return message_results(statements, wanted=(result,))[0]


def message_results(statements: list[Statement], *, wanted: tuple[int, ...] | None = None) -> list[list[tuple]]:
    """The rows of each statement ``wanted`` (all when None), in that order, of ``statements``
    run as ``message_rows`` runs them: one round trip, values bound server-side, or one
    message of ``EXECUTE`` texts when it falls back (then every statement's params must be
    the same dict of named values, or all positional). A statement that returns no rows
    (``BEGIN``, ``COMMIT``) has ``[]``."""
    if wanted is None:
        wanted = tuple(range(len(statements)))
    db = connections[DEFAULT_DB_ALIAS]
    if db.queries_logged or db.execute_wrappers or db.vendor != "postgresql":
        return _as_one_message(statements, wanted)
    sent = []
    for statement in statements:
        if statement.prepare:
            # The wrapper passed on: looked up once per round trip, not once per statement.
            found = prepared.bound(statement.sql, replan_every=statement.replan_every, db=db)
            if found is None:
                return _as_one_message(statements, wanted)
            name, text, order = found[0].encode(), None, found[1]
        else:
            name, (text, order) = None, _unprepared(statement.sql)
        values = _texts(statement.params, order)
        if values is None:
            return _as_one_message(statements, wanted)
        sent.append((name, text, values))
    _checked(db)
    raw = db.connection
    if not raw.autocommit and raw.pgconn.transaction_status == _IDLE:
        return _as_one_message(statements, wanted)  # psycopg sends atomic's BEGIN with it
    with db.wrap_database_errors:
        loader = _loader(db)
        with raw.lock:
            results = raw.wait(_pipeline(raw.pgconn, sent))
        for got in results:
            if got.status not in (_TUPLES_OK, _COMMAND_OK, _PIPELINE_ABORTED):
                raise errors.error_from_result(got, encoding="utf-8")  # Django's client_encoding
        return [_loaded(loader, results[n]) if results[n].status == _TUPLES_OK else [] for n in wanted]


@functools.lru_cache(maxsize=256)
def _unprepared(sql: str) -> tuple[bytes, tuple[str, ...] | int]:
    """An unprepared statement of ``message_results`` (``BEGIN``, a lock, ``COMMIT``) as it is
    sent: its text numbered ``$n`` and encoded, and its parameters' order; once per process."""
    return prepared.numbered(sql).encode(), prepared.order(sql)


def _pipeline(pgconn, sent: list[tuple[bytes | None, bytes | None, list | None]]):
    """A generator for ``connection.wait``: the statements (prepared statement's name, or
    text; values) sent in pipeline mode and one Sync, every result read up to the Sync's;
    returns one result per statement."""
    yield from _send(pgconn, sent)
    return (yield from _read_to_sync(pgconn))


def _as_one_message(statements: list[Statement], wanted: tuple[int, ...]) -> list[list[tuple]]:
    sql = "; ".join(prepared.statement(s.sql, replan_every=s.replan_every) if s.prepare else s.sql for s in statements)
    named = [s.params for s in statements if isinstance(s.params, dict)]
    # Named values: one dict shared by the message's statements (Django's cursor takes one).
    params = named[0] if named else [value for s in statements for value in s.params]
    return _on_a_cursor(_fetch_each, sql, params, wanted)


def _fetch_each(cursor, sql: str, params, wanted: tuple[int, ...]) -> list[list[tuple]]:
    cursor.execute(sql, params)
    found = {}
    for n in range(max(wanted) + 1):
        if n:
            cursor.nextset()
        if n in wanted:
            found[n] = [] if cursor.description is None else cursor.fetchall()
    return [found[n] for n in wanted]


def _texts(params: dict | list | tuple, order: tuple[str, ...] | int) -> list[bytes | None] | None:
    """The values in ``$n`` order as the text PostgreSQL's input functions read, written as
    psycopg's text dumpers write them (``str``; a bool ``t`` or ``f``; a text choice, a
    ``StrEnum``, its text; Django's integer and JSON values, psycopg's ``Int2``/``Int4``/``Int8``
    and ``Json``/``Jsonb`` with their ``dumps``: the number, that function's text); None when
    one is of a type left to psycopg (a naive datetime, a text with a NUL character that
    psycopg refuses, a Decimal NaN or infinity…). ``order``: the names of ``params`` in
    ``$n`` order, or (positional ``params``) their count."""
    texts: list[bytes | None] = []
    # A statement without parameters (``BEGIN``) binds none, whatever its message shares.
    in_order = (params[name] for name in order) if isinstance(order, tuple) else (params if order else ())
    for value in in_order:
        kind = type(value)
        # The commonest kinds first (a track's values are mostly texts and integers): each
        # branch takes values no other branch takes, so their order changes no text.
        if kind is str:
            if "\x00" in value:
                return None
            texts.append(value.encode())  # UTF-8: the client_encoding Django connects with
        elif kind is int:
            texts.append(str(value).encode())
        elif value is None:
            texts.append(None)
        elif isinstance(value, StrEnum) and "\x00" not in value:
            # A StrEnum (Django's text choices) finds psycopg's str dumper first in its MRO:
            # its text is its value.
            texts.append(value.encode())
        elif (
            (kind is datetime and value.utcoffset() is not None)
            or kind is date
            or (kind is Decimal and value.is_finite())
        ):
            texts.append(str(value).encode())
        elif kind is Int8 or kind is Int4 or kind is Int2:
            # Django's integer fields' values on psycopg 3 (``adapt_integerfield_value``).
            texts.append(str(int(value)).encode())
        elif kind is bool:
            texts.append(b"t" if value else b"f")  # psycopg's BoolDumper
        elif (kind is Jsonb or kind is Json) and value.dumps is not None:
            # Django's JSONField values (``adapt_json_value``): psycopg's JSON dumper writes
            # what the wrapper's ``dumps`` returns.
            text = value.dumps(value.obj)
            texts.append(text.encode() if isinstance(text, str) else bytes(text))
        else:
            return None
    return texts


def _checked(db) -> None:
    """What Django's cursor checks before a statement."""
    db.close_if_health_check_failed()
    db.ensure_connection()
    db.validate_thread_sharing()
    db.validate_no_broken_transaction()


def _kept_for(db) -> tuple:
    raw = db.connection
    kept = _kept.get(raw)
    if kept is None or kept[1] != db.timezone or kept[0].closed:
        cursor = db.create_cursor()
        kept = _kept[raw] = (cursor, db.timezone, Transformer.from_context(cursor))
    return kept


def _cursor(db):
    return _kept_for(db)[0]


def _loader(db) -> Transformer:
    """The kept cursor's loaders (Django's time zone, and the cursor's adapters for each
    result's types), for rows read past the cursor. One per kept cursor, as psycopg's cursor
    keeps one: it keeps the loader it made for each type (Django's time zone loader is a
    Python class, made again by a new ``Transformer`` for every result that has a
    ``timestamptz``), so a statement's rows cost their loading alone."""
    return _kept_for(db)[2]


def _loaded(loader: Transformer, result) -> list[tuple]:
    loader.set_pgresult(result)
    try:
        return loader.load_rows(0, result.ntuples, tuple)
    finally:
        loader.set_pgresult(None)  # the result is not kept alive until the next statement


def _fetch(cursor, sql: str, params, result: int) -> list[tuple]:
    cursor.execute(sql, params)
    for _ in range(result):
        cursor.nextset()
    return cursor.fetchall()


class Unawaited:
    """Statements ``send_unawaited`` sent on the default connection, their results not read
    yet. ``wait()`` reads them, raising the first failure as Django's error, and must run
    before anything else uses the connection: until then it is in libpq's pipeline mode with
    results pending, and another statement's results would be read as these."""

    def __init__(self, db=None):
        self._db = db  # None: nothing pending (the statements ran when they were sent)

    def wait(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        raw = db.connection
        with db.wrap_database_errors:
            with raw.lock:
                results = raw.wait(_read_to_sync(raw.pgconn))
            for got in results:
                if got.status not in (_TUPLES_OK, _COMMAND_OK, _PIPELINE_ABORTED):
                    raise errors.error_from_result(got, encoding="utf-8")  # Django's client_encoding


def send_unawaited(statements: list[str]) -> Unawaited:
    """Send ``statements`` (texts without parameters, nor rows wanted) to run in order in the
    caller's transaction, and return without waiting for them: the caller works on while
    PostgreSQL runs them, then calls ``wait()`` before its next statement.

    One libpq pipeline and its Sync, as ``message_results`` sends it, only not read here.
    Whenever ``message_results`` would send text through Django's cursor (statements logged
    or wrapped, not PostgreSQL, a transaction psycopg has yet to BEGIN), they run there and
    then, and ``wait()`` has nothing to do."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.queries_logged or db.execute_wrappers or db.vendor != "postgresql":
        return _run_now(db, statements)
    _checked(db)
    raw = db.connection
    if not raw.autocommit and raw.pgconn.transaction_status == _IDLE:
        return _run_now(db, statements)  # psycopg sends atomic's BEGIN with the first one
    with db.wrap_database_errors, raw.lock:
        raw.wait(_send_only(raw.pgconn, [statement.encode() for statement in statements]))
    return Unawaited(db)


def _run_now(db, statements: list[str]) -> Unawaited:
    with db.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    return Unawaited()


def _send_only(pgconn, texts: list[bytes]):
    """A generator for ``connection.wait``: ``texts`` sent in pipeline mode and one Sync,
    flushed; the results are left for ``_read_to_sync``."""
    yield from _send(pgconn, [(None, text, None) for text in texts])


def _send(pgconn, sent: list[tuple[bytes | None, bytes | None, list | None]]):
    """A generator for ``connection.wait``: the statements (prepared statement's name, or
    text; values) sent in pipeline mode and one Sync, flushed; the results are left for
    ``_read_to_sync``."""
    pgconn.enter_pipeline_mode()
    try:
        for name, text, values in sent:
            if name is None:
                pgconn.send_query_params(text, values or None)
            else:
                pgconn.send_query_prepared(name, values)
        pgconn.pipeline_sync()
        yield from generators.send(pgconn)
    except BaseException:
        # Not all sent (an interrupted flush): what the server has is unknown, so the
        # connection is closed; Django opens a new one for the next request.
        pgconn.finish()
        raise


def _read_to_sync(pgconn):
    """A generator for ``connection.wait``: every result up to the Sync's, then out of
    pipeline mode; returns the statements' results."""
    try:
        results = []
        while True:
            got = yield from generators.fetch_many(pgconn)
            if got and got[0].status == _PIPELINE_SYNC:
                return results
            results.extend(got)
    finally:
        if pgconn.pipeline_status:
            try:
                pgconn.exit_pipeline_mode()
            except errors.OperationalError:
                # Results left unread (a wait interrupted): the session's state is unknown, so the
                # connection is closed; Django opens a new one for the next request.
                pgconn.finish()
