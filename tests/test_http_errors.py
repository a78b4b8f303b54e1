"""Error answers: JSON ``{"code", "message"}`` under /api/, /v1/ and /segment/ whatever
produced the error; friendly HTML pages in the dashboard, never Django's debug pages."""

import pytest
from django.test import Client

from .api_support import INGEST_PATHS


def json_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert body["code"] == code and body["message"], body
    return body


@pytest.mark.parametrize("path", INGEST_PATHS)
def test_it_answers_a_get_on_an_ingest_endpoint_with_a_json_405(client, db, path):
    body = json_error(client.get(path), 405, "method_not_allowed")
    assert body["success"] is False
    assert "GET is not allowed" in body["message"]
    assert client.get(path)["Allow"] == "POST"
    json_error(client.put(path, "{}", content_type="application/json"), 405, "method_not_allowed")


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("path", ["/v1/nothing", "/segment/nothing", "/api/nothing", "/api/v1/nothing/at/all"])
def test_unknown_paths_under_the_api_and_ingest_are_json_404s(client, db, settings, path, debug):
    settings.DEBUG = debug  # no debug page either
    json_error(client.get(path), 404, "not_found")
    json_error(client.post(path, "{}", content_type="application/json"), 404, "not_found")
    json_error(client.delete(path), 404, "not_found")


def test_a_slashless_path_still_redirects_to_its_slashed_page(client, db):
    response = client.get("/api/docs")
    assert response.status_code == 301 and response["Location"] == "/api/docs/"


def test_drf_errors_are_json_even_for_a_client_that_accepts_html(client, tenant):
    html = {"HTTP_ACCEPT": "text/html,application/xhtml+xml"}
    json_error(client.get("/api/v1/users", **html), 401, "not_authenticated")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {tenant.key}", **html}
    json_error(client.get("/api/v1/users/999999", **auth), 404, "not_found")
    json_error(client.get("/api/v1/users", {"page": 99}, **auth), 404, "not_found")
    json_error(client.post("/api/docs/", **html), 405, "method_not_allowed")
    # Successful answers still render the browsable API for a browser.
    assert client.get("/api/v1/users", **auth)["Content-Type"].startswith("text/html")


@pytest.mark.urls("tests.error_urls")
@pytest.mark.parametrize("debug", [False, True])
def test_an_exception_is_a_json_500_under_the_api_and_ingest(db, settings, debug):
    settings.DEBUG = debug  # never the debug page, never a traceback in the body
    client = Client(raise_request_exception=False)
    for path in ("/api/v1/boom", "/api/v1/boom-drf", "/v1/boom"):
        body = json_error(client.get(path), 500, "server_error")
        assert "a bug" not in str(body)
    assert client.get("/v1/boom").json()["success"] is False


@pytest.mark.urls("tests.error_urls")
def test_an_exception_in_the_dashboard_is_a_friendly_page(db):
    response = Client(raise_request_exception=False).get("/boom/")
    assert response.status_code == 500 and response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "Something went wrong" in page and "a bug" not in page


def assert_friendly_404s(client, paths) -> list[str]:
    """Each path answers the dashboard's own 404 page, never Django's debug page."""
    pages = []
    for path in paths:
        response = client.get(path)
        assert response.status_code == 404, path
        page = response.content.decode()
        assert 'id="not-found"' in page and "URLconf" not in page and "Page not found at" not in page, path
        pages.append(page)
    return pages


@pytest.mark.parametrize("debug", [False, True])
def test_an_unknown_dashboard_page_is_a_friendly_404_even_in_debug(member_client, settings, debug):
    settings.DEBUG = debug
    assert_friendly_404s(member_client, ("/no-such-page/", "/no-such-page", "/users/x/y/z"))


def test_a_slashless_dashboard_path_still_redirects_to_its_page(member_client):
    response = member_client.get("/users")
    assert (response.status_code, response["Location"]) == (301, "/users/")


@pytest.mark.parametrize("debug", [False, True])
def test_a_user_that_does_not_exist_is_the_dashboard_s_404_page_even_in_debug(member_client, settings, debug):
    settings.DEBUG = debug
    paths = ("/users/999999/", "/users/999999/delete/", "/duplicates/preview/?users=1&users=x")
    for page in assert_friendly_404s(member_client, paths):
        assert 'href="/users/"' in page  # the navigation stays


def test_a_post_to_an_unknown_path_is_a_404_not_a_csrf_refusal(client, db):
    api = client.post("/api/v1/events/null/void", "{}", content_type="application/json")
    page = client.post("/no-such-page/", {"a": "b"})
    assert (api.status_code, api.json()["code"]) == (404, "not_found")
    assert page.status_code == 404 and 'id="not-found"' in page.content.decode()
