"""Django's PostgreSQL backend, with a connection health check that sends nothing.

Django's check (``CONN_HEALTH_CHECKS``) runs ``SELECT 1`` before the first query of every
request that reuses a persistent connection: a round trip per request, a third of what the
B-insert baseline pays and one of the six a single track used to. This backend answers the
same question from the socket instead: an idle connection whose socket is readable has
received something it did not ask for, which from PostgreSQL means the server closed it
(shutdown, restart, ``pg_terminate_backend``, ``idle_session_timeout``: a FATAL message,
then end of file). Such a connection is closed and a new one opened, exactly as after a
failed ``SELECT 1``. A connection that died without a word (a network partition) is
caught by neither check until a query fails; the request then answers as it does today.

The check after an error (``close_if_unusable_or_obsolete`` at the end of a request that
raised a database error) still runs Django's ``SELECT 1``: it is rare, and it must be sure.

It also lets ``kana.db.pipelined.atomic`` hand a transaction that module opened (its
``BEGIN`` sent by hand on a connection in autocommit) to Django's ``atomic``, which psycopg
otherwise refuses (see ``_set_autocommit``).
"""

import select

from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLDatabaseWrapper
from psycopg import pq


def socket_says_alive(connection) -> bool:
    """True when an idle psycopg connection looks usable without sending anything."""
    if connection is None or connection.closed or connection.broken:
        return False
    # Read from libpq's connection: ``connection.info`` builds a ConnectionInfo per read
    # (about half of this check's Python, once a request).
    pgconn = connection.pgconn
    if pgconn.status != pq.ConnStatus.OK:
        return False
    if pgconn.transaction_status != pq.TransactionStatus.IDLE:
        return False  # a request left a transaction open: not reusable as it is
    try:
        readable, _, _ = select.select([connection.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class DatabaseWrapper(PostgreSQLDatabaseWrapper):
    # Set by kana.db.pipelined.atomic around its atomic's entry, nowhere else.
    adopt_open_transaction = False

    def _set_autocommit(self, autocommit):
        raw = self.connection
        if (
            self.adopt_open_transaction
            and not autocommit
            and raw.autocommit
            and raw.info.transaction_status == pq.TransactionStatus.INTRANS
        ):
            # psycopg will not turn autocommit off inside a transaction, to keep a caller from
            # losing track of it; here the caller (kana.db.pipelined.atomic) opened it and
            # hands it on on purpose. Off, psycopg sends no BEGIN of its own while the
            # transaction is open, and Django's atomic commits or rolls it back as its own.
            raw._autocommit = False
            return
        super()._set_autocommit(autocommit)

    def close_if_health_check_failed(self):
        if self.connection is None or not self.health_check_enabled or self.health_check_done:
            return
        if not socket_says_alive(self.connection):
            self.close()
        self.health_check_done = True
