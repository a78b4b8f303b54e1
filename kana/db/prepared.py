"""Statements PREPAREd once per connection and EXECUTEd by name, alone or in a message with others.

For a hot path's short statements PostgreSQL spends more time parsing and planning than
running them (EXPLAIN and backend CPU per statement: docs/performance-history.md, "Round 5: s1prep"
and the entitlement reads of round 4). Django's server-side binding cannot carry the
multi-statement messages of ``kana.db.pipelined``, so statements are prepared as text: one
``PREPARE`` per connection and statement shape, in a round trip of its own (it only parses
and plans; a prepared statement outlives a rollback, so it may be sent inside a transaction),
then ``EXECUTE name(…)`` with the values bound client-side like any other statement.

What a caller must know:

- ``statement(sql)`` returns the text to send instead of ``sql``, with the same parameters
  (``%s`` list or ``%(name)s`` dict). It returns ``sql`` itself when connections are not
  kept between requests (``CONN_MAX_AGE=0``: preparing would only add a round trip), off
  PostgreSQL, and once a connection holds ``MAX_PER_CONNECTION`` statements (a statement
  whose text varies with its input must not fill the server's memory: callers prepare only
  shapes of a bounded number, this is the backstop).
- ``statement(sql, replan_every=n)``: the statement is prepared again (``DEALLOCATE`` and
  ``PREPARE`` in a round trip of their own) after every ``n`` uses on a connection. A
  generic plan is made once and kept until an ``ANALYZE`` or DDL invalidates it, with the
  table's size as it was then: one made while a table was empty (and never analyzed) may
  pick any index that ties at one estimated row, and scan with it as the table grows.
  Preparing again makes the plan anew from the table's current size; the cost is one
  round trip per ``n`` uses.
- ``bound(sql)``: the prepared statement's name and its parameters in ``$n`` order, for a
  caller that sends the values in the protocol's Bind message instead of an ``EXECUTE`` text
  (``kana.db.kept_cursor.prepared_rows``: the entitlement check's statements). The same
  prepared statement, its types inferred from its text as for ``EXECUTE``, so the same plan.
- A statement discarded behind our back (``DEALLOCATE ALL``, a pooler's new session) fails
  with ``InvalidSqlStatementName``; ``forget_if_missing(error)`` makes the next use prepare
  again, and ``again_if_missing`` re-runs a caller's transaction once.
"""

import functools
import hashlib
import re
import weakref
from collections.abc import Callable
from typing import TypeVar

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, connections
from psycopg import errors

T = TypeVar("T")

# Statements per connection before new shapes go unprepared.
MAX_PER_CONNECTION = 64
# ``replan_every`` of the hot paths' reads and merges (the track's and identify's reads, a
# merge's statements): a generic plan made on near-empty tables (a new database) may tie a
# workspace-only index with the right one and keep scanning the workspace with it as the
# tables grow, until an ANALYZE; preparing again costs one round trip per this many uses.
REPLAN_EVERY = 1000
_PREFIX = "kana_"
_PREFIX_PATTERN = r"kana\_%"
# Named or positional parameters; ``%%`` is a literal percent sign, left as it is.
_PARAMETER = re.compile(r"%%|%\((\w+)\)s|%s")
# psycopg connection -> names of the statements prepared on it (read from the server first).
_prepared: "weakref.WeakKeyDictionary[object, set[str]]" = weakref.WeakKeyDictionary()
# psycopg connection -> uses since it was prepared, of the statements prepared with ``replan_every``.
_uses: "weakref.WeakKeyDictionary[object, dict[str, int]]" = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=256)
def _shape(sql: str) -> tuple[str, str, str]:
    """(name, PREPARE text, EXECUTE text) of a statement: computed once per process."""
    names: list[str] = []
    positional = 0

    def number(match: re.Match) -> str:
        nonlocal positional
        if match.group(0) == "%%":
            return "%"  # PREPARE is sent without parameters: no escaping
        if match.group(1) is None:
            positional += 1
            return f"${positional}"
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    numbered = _PARAMETER.sub(number, sql)
    if names and positional:
        raise ValueError("a statement's parameters are all named or all positional")
    name = _PREFIX + hashlib.blake2b(sql.encode(), digest_size=8).hexdigest()
    arguments = [f"%({n})s" for n in names] if names else ["%s"] * positional
    execute = f"EXECUTE {name}" + (f"({', '.join(arguments)})" if arguments else "")
    # PREPARE's text goes to the server with no parameters: a literal % must not be doubled.
    return name, f"PREPARE {name} AS {numbered}", execute


@functools.lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """``sql`` with its parameters numbered ``$1``, ``$2``… as ``PREPARE`` receives it, for a
    caller that sends it unprepared with its values bound (``kana.db.kept_cursor.message_rows``);
    the values go in ``order``'s order."""
    name, prepare, _ = _shape(sql)
    return prepare.removeprefix(f"PREPARE {name} AS ")


@functools.lru_cache(maxsize=256)
def order(sql: str) -> tuple[str, ...] | int:
    """A statement's parameters in ``$n`` order, as ``_shape`` numbers them: their names (a
    name used twice is one parameter), or how many positional ones."""
    names: list[str] = []
    positional = 0
    for match in _PARAMETER.finditer(sql):
        if match.group(0) == "%%":
            continue
        if match.group(1) is None:
            positional += 1
        elif match.group(1) not in names:
            names.append(match.group(1))
    return tuple(names) if names else positional


def statement(sql: str, *, replan_every: int | None = None) -> str:
    """``EXECUTE`` of ``sql`` (its parameters as given to ``cursor.execute``), prepared on this
    connection first if it is not yet (one round trip, once per connection and shape, and
    once per ``replan_every`` uses when given); ``sql`` itself when nothing is to be prepared
    (see the module docstring)."""
    shape = _prepared_shape(sql, replan_every)
    return sql if shape is None else shape[2]


def bound(sql: str, *, replan_every: int | None = None, db=None) -> tuple[str, tuple[str, ...] | int] | None:
    """For a caller that binds the values server-side (``kana.db.kept_cursor.prepared_rows``
    and ``message_rows``): the name of ``sql``'s prepared statement on this connection,
    prepared first as ``statement`` does (``replan_every`` as there), and its parameters in
    ``$n`` order (their names, or how many positional ones); None when ``statement`` would
    send ``sql`` itself. ``db``: the default database's wrapper, when the caller has looked
    it up already."""
    shape = _prepared_shape(sql, replan_every, db)
    return None if shape is None else (shape[0], order(sql))


def _prepared_shape(sql: str, replan_every: int | None, db=None) -> tuple[str, str, str] | None:
    # The connection itself, looked up once (or passed by a caller that has it): each
    # attribute read through Django's ``connection`` proxy looks it up again in a thread- and
    # task-local (asgiref's ``Local``, ≈ 1 µs each), and this runs twice per single track.
    if db is None:
        db = connections[DEFAULT_DB_ALIAS]
    if db.vendor != "postgresql" or db.settings_dict.get("CONN_MAX_AGE") == 0:
        return None
    shape = _shape(sql)
    name, prepare, _ = shape
    raw = db.connection
    if raw is None:
        # Opened here only when it is not yet: ``ensure_connection`` itself (its async check
        # and the call, twice a track) is what the caller's statement does next anyway
        # (``kept_cursor._checked``, or Django's cursor).
        db.ensure_connection()
        raw = db.connection
    done = _prepared.get(raw)
    if done is None:
        # What the server holds, read once per connection (and after a missing one's error).
        with db.cursor() as cursor:
            cursor.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE %s", [_PREFIX_PATTERN])
            done = _prepared[raw] = {row[0] for row in cursor.fetchall()}
    if name not in done:
        if len(done) >= MAX_PER_CONNECTION:
            return None
        with db.cursor() as cursor:
            cursor.execute(prepare)  # no parameters: nothing is interpolated
        done.add(name)
        if replan_every:
            _uses.setdefault(raw, {})[name] = 0
    if replan_every:
        uses = _uses.setdefault(raw, {})
        if uses.get(name, 0) >= replan_every:
            with db.cursor() as cursor:
                cursor.execute(f"DEALLOCATE {name}; {prepare}")
            uses[name] = 0
        uses[name] = uses.get(name, 0) + 1
    return shape


def is_missing(error: BaseException) -> bool:
    """Whether ``error`` names a prepared statement the server does not hold."""
    return isinstance(getattr(error, "__cause__", None), errors.InvalidSqlStatementName) or isinstance(
        error, errors.InvalidSqlStatementName
    )


def forget_if_missing(error: DatabaseError) -> None:
    """After an error naming a missing prepared statement (the session's statements were
    discarded behind our back): read what the server holds again on next use. The error
    itself is the caller's to raise."""
    if is_missing(error) and connection.connection is not None:
        _prepared.pop(connection.connection, None)
        _uses.pop(connection.connection, None)


def forget_all() -> None:
    """As for a new connection: what the server holds is read again on next use (tests)."""
    _prepared.clear()
    _uses.clear()


def again_if_missing(operation: Callable[[], T]) -> T:
    """Run a transaction (``operation``) that executes prepared statements; if one was
    discarded behind our back, the transaction failed and was rolled back with nothing
    stored: run it once more, preparing again, instead of failing the request."""
    try:
        return operation()
    except DatabaseError as error:
        if not is_missing(error):
            raise
        forget_if_missing(error)
    return operation()
