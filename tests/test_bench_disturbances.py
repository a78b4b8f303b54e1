"""The benchmark reports what else the database server did during a measured window.

A tail is only read against what happened in its window: a checkpoint (server-wide), and
the database connections the app opened (a connection reaching ``CONN_MAX_AGE``)."""

import time

import psycopg
import pytest
from django.db import connection

from bench import stack

from .conftest import requires_postgres

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


def _dsn() -> str:
    s = connection.settings_dict
    return f"postgresql://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def test_a_checkpoint_and_a_connection_opened_during_the_window_are_reported():
    with stack.CpuMeter({}, _dsn(), exclude_backends=set()) as meter:
        with psycopg.connect(_dsn(), autocommit=True) as opened:
            started = opened.execute(
                "SELECT to_char(backend_start AT TIME ZONE 'UTC', 'HH24:MI:SS.MS') FROM pg_stat_activity"
                " WHERE pid = pg_backend_pid()"
            ).fetchone()[0]
            opened.execute("CHECKPOINT")
            time.sleep(stack.CpuMeter.INTERVAL * 2.5)  # seen by the meter's samples
    seen = meter.disturbances
    assert seen["checkpoints"] >= 1
    assert started in seen["connections_opened_at"]
    assert seen["samples"] >= 2
    assert set(seen["run_queue_wait_seconds"]) == {"postgres"}
