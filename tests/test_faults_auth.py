"""Issue 15, items 4 and 5: credentials that are not text the key hash can take answer 401,
never 500, on ingest and on the REST API."""

import base64

import pytest
from django.test import Client

from features.models import Event

from .conftest import ingest_client

INGEST = ["/segment/events", "/v1/track", "/v1/identify", "/v1/batch"]


@pytest.mark.parametrize("path", INGEST)
def test_a_lone_surrogate_write_key_is_an_invalid_key(db, ingest_route, path):
    # "\ud800" escaped in the JSON text: json.loads gives a str that UTF-8 cannot encode.
    response = ingest_client().post(path, '{"writeKey": "\\ud800", "type": "track"}', content_type="application/json")
    assert response.status_code == 401, response.content
    assert response.json()["code"] == "invalid_api_key"
    assert not Event.objects.exists()


# WSGI hands headers over as latin-1 text: the bytes c3 a9 arrive as "Ã©".
NON_ASCII_HEADERS = [
    "Basic \xc3\xa9",
    "Basic é",
    "Basic " + base64.b64encode(b"\xff\xfe:").decode(),  # valid base64, not UTF-8
    "Bearer \xc3\xa9",
    "\xc3\xa9",
]


@pytest.mark.parametrize("header", NON_ASCII_HEADERS)
@pytest.mark.parametrize("path", INGEST)
def test_non_ascii_credentials_are_refused_on_ingest(db, ingest_route, path, header):
    body = '{"userId": "u", "event": "e", "type": "track"}'
    response = ingest_client().post(path, body, content_type="application/json", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401, response.content
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["code"] in ("missing_api_key", "invalid_api_key")
    assert not Event.objects.exists()


@pytest.mark.parametrize("header", NON_ASCII_HEADERS)
@pytest.mark.parametrize("path", ["/api/v1/features", "/api/v1/users", "/api/v1/users/export"])
def test_non_ascii_credentials_are_refused_by_the_api(db, path, header):
    response = Client().get(path, HTTP_AUTHORIZATION=header)
    assert response.status_code == 401, response.content
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["code"] == "invalid_api_key"
