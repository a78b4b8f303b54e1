"""A persistent connection's age limit (``CONN_MAX_AGE``) is spread over its last quarter.

gunicorn's workers open their connections on their first requests, all within milliseconds;
with the same limit each, they all reconnect on the same request, again every limit, and
every worker pays a new backend's cold start at once. Spread, connections opened together
are closed apart, and never later than the limit.
"""

import time

import pytest
from django.db import connection

from .conftest import requires_postgres

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


def _lifetimes(monkeypatch, max_age, count: int = 20) -> list[float | None]:
    """How long each of ``count`` connections, opened one after the other, may live."""
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", max_age)
    lifetimes = []
    for _ in range(count):
        connection.close()
        opened = time.monotonic()
        connection.ensure_connection()
        lifetimes.append(None if connection.close_at is None else connection.close_at - opened)
    connection.close()
    return lifetimes


def test_connections_opened_together_are_closed_apart_and_never_after_the_limit(monkeypatch):
    lifetimes = _lifetimes(monkeypatch, 60)
    assert all(45 - 1 <= lifetime <= 60 for lifetime in lifetimes)
    # Spread: not one shared instant (without the spread, every lifetime is 60 s).
    assert max(lifetimes) - min(lifetimes) > 3


def test_no_limit_and_a_zero_limit_are_kept_as_configured(monkeypatch):
    assert _lifetimes(monkeypatch, None, count=2) == [None, None]
    assert all(lifetime < 1 for lifetime in _lifetimes(monkeypatch, 0, count=2))  # closed after the request
