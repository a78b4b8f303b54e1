"""Issue 15, item 10: with PostgreSQL unreachable, the REST API and the dashboard answer 503
(with Retry-After) like ingest does, not 500.

A real connection failure: the test points this process's connection at a loopback port
nothing listens on, so every query fails to connect exactly as with the server down.
"""

import socket

import pytest
from django.db import connection
from django.test import Client

from tests.conftest import ingest_client, requires_postgres

pytestmark = requires_postgres


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture
def database_down(transactional_db):
    connection.close()
    saved = dict(connection.settings_dict)
    connection.settings_dict.update(HOST="127.0.0.1", PORT=str(_closed_port()))
    yield
    connection.close()
    connection.settings_dict.clear()
    connection.settings_dict.update(saved)


@pytest.fixture
def signed_in(tenant, member_client):
    return member_client


@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/api/v1/users"),
        ("get", "/api/v1/features"),
        ("post", "/api/v1/features"),
        ("get", "/api/v1/rules/1"),
        ("get", "/api/v1/users/export"),
        ("delete", "/api/v1/users/1"),
    ],
)
def test_the_api_answers_503_json_with_retry_after(tenant, database_down, method, path):
    client = Client(raise_request_exception=False)
    response = getattr(client, method)(path, HTTP_AUTHORIZATION=f"Bearer {tenant.key}")
    assert response.status_code == 503, response.content
    assert response["Content-Type"].startswith("application/json")
    assert response["Retry-After"].isdigit()
    assert response.json()["code"] == "database_unavailable"


@pytest.mark.parametrize("path", ["/", "/users/", "/rules/", "/users/1/"])
def test_the_dashboard_answers_a_503_page(signed_in, database_down, path):
    signed_in.raise_request_exception = False
    response = signed_in.get(path)
    assert response.status_code == 503, response.content[:500]
    assert response["Content-Type"].startswith("text/html")
    assert response["Retry-After"].isdigit()
    assert b"unavailable" in response.content


def test_ingest_still_answers_503(tenant, database_down, ingest_route):
    response = ingest_client(raise_request_exception=False).post(
        "/v1/track",
        '{"userId": "u", "event": "e"}',
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {tenant.key}",
    )
    assert response.status_code == 503 and response.json()["code"] == "database_unavailable"
