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

from contextlib import contextmanager

from django.db import DatabaseError, connection
from psycopg import pq


def available() -> bool:
    return connection.vendor == "postgresql" and connection.get_autocommit() and not connection.in_atomic_block


def in_transaction() -> bool:
    raw = connection.connection
    return raw is not None and not raw.closed and raw.info.transaction_status != pq.TransactionStatus.IDLE


BEGIN = "BEGIN; "
COMMIT = "; COMMIT"


@contextmanager
def transaction():
    """The block's statements form one transaction (see the module docstring)."""
    try:
        yield
    except BaseException:
        if in_transaction():
            try:
                with connection.cursor() as cursor:
                    cursor.execute("ROLLBACK")
            except DatabaseError:
                connection.close()  # a broken connection: the server rolls back on its own
        raise
    if in_transaction():
        with connection.cursor() as cursor:
            cursor.execute("COMMIT")
