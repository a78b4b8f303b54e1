"""A transaction whose BEGIN travels with its first statement and COMMIT with its last.

For a hot path that is one short transaction per request (a single track): Django's
``transaction.atomic`` costs two round trips of its own (psycopg sends ``BEGIN`` by itself
before the first statement, ``COMMIT`` by itself at the end). Here the connection stays in
autocommit, the first statement sent starts with ``BEGIN;`` and the last ends with
``; COMMIT`` (PostgreSQL runs the statements of one message in order, each with its own
snapshot under READ COMMITTED, exactly as if they were sent one by one). The statements,
their order and the transaction they form are unchanged; only the messages are fewer.

What a caller must know:

- Only on PostgreSQL, and only outside any ``atomic`` block (``available()``): inside one,
  the caller's transaction is already open and must not be committed from here.
- Django does not know the transaction is open: ``transaction.on_commit`` would run its
  callback at once, and ``atomic`` must not be entered inside. The block leaves no
  transaction open: on success it sends ``COMMIT`` if the last statement did not carry it;
  on any exception it sends ``ROLLBACK`` (or finds the server already ended it).
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, connections
from django.db import transaction as django_transaction
from psycopg import pq


# Both run on every single track: the connection is looked up once (each attribute read
# through Django's ``connection`` proxy looks it up again in asgiref's ``Local``), and the
# transaction status read from libpq's connection (``raw.info`` builds a ConnectionInfo).
def available() -> bool:
    db = connections[DEFAULT_DB_ALIAS]
    return db.vendor == "postgresql" and db.get_autocommit() and not db.in_atomic_block


def in_transaction() -> bool:
    raw = connections[DEFAULT_DB_ALIAS].connection
    return raw is not None and not raw.closed and raw.pgconn.transaction_status != pq.TransactionStatus.IDLE


@dataclass(frozen=True)
class Step:
    """A statement handed to another layer to send in its message (``execute_all``), so that
    work owned by several layers still costs one round trip: ``params`` are positional
    (``%s``), and ``then``, when given, is called with the statement's rows once the message
    has run (in the same transaction)."""

    sql: str
    params: list
    then: Callable[[list[tuple]], None] | None = None


BEGIN = "BEGIN; "
COMMIT = "; COMMIT"


class transaction:  # noqa: N801 - used as a function: ``with pipelined.transaction():``
    """The block's statements form one transaction (see the module docstring).

    A class rather than ``@contextmanager``: a single track enters it once, and the generator
    machinery (the helper object, the generator, its frame resumed twice) cost about a
    microsecond more than two plain method calls."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None:
            # Any exception (BaseException too): the transaction is rolled back, the
            # exception goes on.
            if in_transaction():
                try:
                    with connection.cursor() as cursor:
                        cursor.execute("ROLLBACK")
                except DatabaseError:
                    connection.close()  # a broken connection: the server rolls back on its own
            return False
        if in_transaction():
            with connection.cursor() as cursor:
                cursor.execute("COMMIT")
        return False


@contextmanager
def atomic():
    """Inside ``transaction``: from here on, the open transaction is Django's ``atomic``
    (``on_commit`` callbacks wait for its commit, nested ``atomic`` blocks are savepoints),
    and the block's end commits it (or rolls it back on an exception).

    For a caller that learns from its first statements' rows that the rest needs ``atomic``
    (an identify that merges: its receivers may enqueue work on commit): what it did and
    the locks it holds stay, where rolling back and starting again in ``atomic`` would
    repeat them (two round trips and the Python of the first pass).
    """
    if not in_transaction() or connection.in_atomic_block:
        raise RuntimeError("pipelined.atomic hands on a transaction opened by pipelined.transaction")
    # The connection's health was checked by the first statement of the transaction (Django
    # checks once per request, before the first query): entering atomic checks nothing again.
    connection.adopt_open_transaction = True
    try:
        with django_transaction.atomic():
            connection.adopt_open_transaction = False
            yield
    finally:
        connection.adopt_open_transaction = False


def execute_all(statements: list[tuple[str, list | dict]], *, begin: bool = False) -> list[list[tuple]]:
    """Run statements in order in the caller's transaction; returns each one's rows ([] for
    a statement that returns none).

    On PostgreSQL they travel in one message (one round trip), and the server still runs them
    one after the other, each with its own snapshot: the same work as separate ``execute``
    calls. Elsewhere (SQLite takes one statement per call) they are sent one by one. Every
    statement's parameters must be of one style: all ``%s`` lists, or all ``%(name)s`` dicts.
    ``begin`` (PostgreSQL, inside ``transaction``): the same message opens the transaction.
    """
    results: list[list[tuple]] = []
    with connection.cursor() as cursor:
        if connection.vendor != "postgresql":
            for sql, params in statements:
                cursor.execute(sql, params)
                results.append(cursor.fetchall() if cursor.description else [])
            return results
        if statements and isinstance(statements[0][1], dict):
            params: list | dict = {}
            for _, named in statements:
                params.update(named)
        else:
            params = [value for _, positional in statements for value in positional]
        cursor.execute((BEGIN if begin else "") + "; ".join(sql for sql, _ in statements), params)
        if begin:
            cursor.nextset()  # past BEGIN's result
        for index in range(len(statements)):
            if index:
                cursor.nextset()
            results.append(cursor.fetchall() if cursor.description else [])
    return results
