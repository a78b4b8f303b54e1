"""The PostgreSQL health check reads the socket instead of sending SELECT 1 per request.

A connection the server closed (a restart, ``pg_terminate_backend``) must still be replaced
before a request uses it, as Django's own check does; a live one must be kept.
"""

import time

import psycopg
import pytest
from django.db import connection

from kana.db.postgresql.base import socket_says_alive

from .conftest import requires_postgres

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


def _terminate(pid: int) -> None:
    settings = connection.settings_dict
    with psycopg.connect(
        host=settings["HOST"],
        port=settings["PORT"] or 5432,
        user=settings["USER"],
        dbname=settings["NAME"],
        password=settings["PASSWORD"] or None,
        autocommit=True,
    ) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


def _wait_until_dead(raw, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while socket_says_alive(raw) and time.monotonic() < deadline:
        time.sleep(0.02)


def _start_request() -> None:
    """What Django does for each request: the check runs again before the first query."""
    connection.health_check_enabled = True
    connection.health_check_done = False


def test_a_live_idle_connection_is_kept():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    assert socket_says_alive(connection.connection)
    _start_request()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] == pid


def test_a_connection_the_server_closed_is_replaced_before_the_request_uses_it():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    _terminate(pid)
    _wait_until_dead(connection.connection)
    assert not socket_says_alive(connection.connection)

    _start_request()
    with connection.cursor() as cursor:  # no error: a fresh connection answers
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid


def test_a_connection_left_inside_a_transaction_is_not_reused():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    raw = connection.connection
    raw.execute("BEGIN")
    assert not socket_says_alive(raw)
    raw.execute("ROLLBACK")
    assert socket_says_alive(raw)
