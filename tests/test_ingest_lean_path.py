"""The lean WSGI ingest app (segment_ingest.wsgi) answers exactly as the Django views do.

Each case sends the same request to a fresh workspace through each route (Django's test
client, and gunicorn's entry kana.wsgi.application) and compares status, headers and body.
"""

import gzip
import hashlib
import hmac
import json
from unittest import mock

import pytest
from django.core.wsgi import get_wsgi_application
from django.db import OperationalError, connection
from django.test import Client

from features.models import Event
from kana.lean import LeanApp
from segment_ingest import handlers
from segment_ingest.wsgi import LeanIngestApp

from .conftest import make_tenant, requires_postgres
from .wsgi_client import WsgiClient

TRACK = {"type": "track", "userId": "u1", "event": "Report Exported", "messageId": "m-1"}
BIG = {**TRACK, "properties": {"blob": "x" * 40_000}}


def _json(body) -> bytes:
    return json.dumps(body).encode()


def _signed(tenant, body: bytes) -> dict:
    tenant.workspace.signing_secret = "s3cret"
    tenant.workspace.save(update_fields=["signing_secret"])
    return {"HTTP_X_SIGNATURE": hmac.new(b"s3cret", body, hashlib.sha1).hexdigest()}


# (path, body, headers given the tenant) for each kind of answer the endpoints give.
CASES = {
    "stored": ("/v1/track", _json(TRACK), lambda t: {"HTTP_AUTHORIZATION": t.basic()}),
    "any type": ("/segment/events", _json(TRACK), lambda t: {"HTTP_AUTHORIZATION": f"Bearer {t.key}"}),
    "write key": ("/v1/track", _json({**TRACK, "writeKey": None}), lambda t: {}),
    "batch": (
        "/v1/batch",
        _json({"batch": [TRACK, {"type": "track"}, {**TRACK, "messageId": "m-2"}]}),
        lambda t: {"HTTP_AUTHORIZATION": t.basic()},
    ),
    "import": ("/v1/import", _json({"batch": [TRACK]}), lambda t: {"HTTP_AUTHORIZATION": t.basic()}),
    "gzip": (
        "/v1/track",
        gzip.compress(_json(TRACK)),
        lambda t: {"HTTP_AUTHORIZATION": t.basic(), "HTTP_CONTENT_ENCODING": "gzip"},
    ),
    "signed": ("/v1/track", _json(TRACK), lambda t: {"HTTP_AUTHORIZATION": t.basic(), **_signed(t, _json(TRACK))}),
    "bad signature": ("/v1/track", _json(TRACK), lambda t: {"HTTP_AUTHORIZATION": t.basic(), **_signed(t, b"{}")}),
    "missing key": ("/v1/track", _json(TRACK), lambda t: {}),
    "unknown key": ("/v1/track", _json(TRACK), lambda t: {"HTTP_AUTHORIZATION": "Bearer prv_live_nope"}),
    "invalid json": ("/v1/track", b"{nope", lambda t: {"HTTP_AUTHORIZATION": t.basic()}),
    "not an object": ("/v1/track", b"[1]", lambda t: {"HTTP_AUTHORIZATION": t.basic()}),
    "invalid message": ("/v1/identify", _json({"traits": {}}), lambda t: {"HTTP_AUTHORIZATION": t.basic()}),
    "too large": ("/v1/track", _json(BIG), lambda t: {"HTTP_AUTHORIZATION": t.basic()}),
    "invalid gzip": (
        "/v1/track",
        b"not gzip",
        lambda t: {"HTTP_AUTHORIZATION": t.basic(), "HTTP_CONTENT_ENCODING": "gzip"},
    ),
    "invalid batch": ("/v1/batch", _json({"batch": [{"type": "track"}]}), lambda t: {"HTTP_AUTHORIZATION": t.basic()}),
    "unknown path": ("/v1/trak", _json(TRACK), lambda t: {"HTTP_AUTHORIZATION": t.basic()}),
    "trailing slash": ("/v1/track/", _json(TRACK), lambda t: {"HTTP_AUTHORIZATION": t.basic()}),
}


def _answer(client_class, case: str, method: str = "post", **client_options):
    path, body, headers = CASES[case]
    tenant = make_tenant(f"{case} via {client_class.__name__}")
    if case == "write key":
        body = _json({**TRACK, "writeKey": tenant.key})
    client = client_class(**client_options)
    if method == "post":
        response = client.post(path, body, content_type="application/json", **headers(tenant))
    else:
        response = client.generic(method.upper(), path, body, **headers(tenant))
    return response.status_code, dict(response.headers), response.content


def _same_answer(case: str, method: str = "post", **client_options):
    django = _answer(Client, case, method, **client_options)
    lean = _answer(WsgiClient, case, method, **client_options)
    assert lean == django
    return lean


def test_it_is_gunicorns_entry():
    from kana.wsgi import application

    assert isinstance(application, LeanApp)


def test_it_answers_the_paths_the_url_conf_routes_to_the_ingest_views():
    from segment_ingest import urls

    assert {f"/{pattern.pattern}" for pattern in urls.urlpatterns} == set(handlers.HANDLERS_BY_PATH)


@pytest.mark.parametrize("case", CASES)
def test_it_answers_as_the_django_view(db, case):
    status, headers, body = _same_answer(case)
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"  # SecurityMiddleware's, on both routes
    assert "Referrer-Policy" in headers and "Cross-Origin-Opener-Policy" in headers
    assert int(headers["Content-Length"]) == len(body)


@pytest.mark.parametrize("method", ["get", "put", "delete", "options"])
def test_other_methods_get_the_same_405(db, method):
    status, headers, body = _same_answer("stored", method)
    assert status == 405 and headers["Allow"] == "POST"


def test_it_answers_ingest_posts_without_djangos_handler(db):
    from kana.wsgi import application

    with mock.patch.object(application, "django_app", side_effect=AssertionError("went through Django")):
        status, _headers, _body = _answer(WsgiClient, "stored")
    assert status == 200 and Event.objects.count() == 1


def test_a_disallowed_host_is_left_to_django(db, settings):
    settings.ALLOWED_HOSTS = ["kana.example"]
    status, _headers, _body = _same_answer("stored")
    assert status == 400
    assert not Event.objects.exists()


def test_a_request_dependent_security_setting_leaves_every_request_to_django(db, settings):
    settings.SECURE_SSL_REDIRECT = True
    # Django's middleware read their settings once, when the handler is built (at start-up).
    application = LeanIngestApp(get_wsgi_application())
    assert not application.enabled
    with mock.patch("kana.wsgi.application", application):
        status, headers, _body = _same_answer("stored")
    assert status == 301 and headers["Location"].startswith("https://")


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (OperationalError("the server closed the connection"), 503, "database_unavailable"),
        (handlers.RetriesExhausted("busy"), 503, "conflict_retry"),
    ],
)
def test_database_trouble_gets_the_same_retryable_answer(db, error, status, code):
    with mock.patch.object(handlers, "ingest_messages", side_effect=error):
        answer = _same_answer("stored")
    assert answer[0] == status and answer[1]["Retry-After"] == "5"
    assert json.loads(answer[2])["code"] == code


def test_an_overloaded_database_gets_the_same_429(db):
    cause = type("LockTimeout", (Exception,), {"sqlstate": "55P03"})()
    error = OperationalError("lock timeout")
    error.__cause__ = cause
    with mock.patch.object(handlers, "ingest_messages", side_effect=error):
        status, headers, body = _same_answer("stored")
    assert status == 429 and headers["Retry-After"] == "5"
    assert json.loads(body)["code"] == "overloaded"


def test_an_unexpected_error_is_a_logged_json_500_without_a_traceback(db, caplog):
    with mock.patch.object(handlers, "ingest_messages", side_effect=RuntimeError("boom")):
        status, headers, body = _same_answer("stored", raise_request_exception=False)
    assert status == 500
    assert json.loads(body) == {
        "success": False,
        "code": "server_error",
        "message": "something went wrong on Kana's side; it has been logged",
    }
    assert b"boom" not in body and b"Traceback" not in body
    assert [r for r in caplog.records if r.name == "django.request" and r.levelname == "ERROR"]


@pytest.mark.parametrize("case", ["missing key", "too large", "invalid json"])
def test_a_refusal_is_logged_as_django_logs_it(db, caplog, case):
    records = {}
    for client_class in (Client, WsgiClient):
        caplog.clear()
        _answer(client_class, case)
        records[client_class] = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "django.request"]
    assert records[WsgiClient] == records[Client]
    assert len(records[Client]) == 1 and records[Client][0][0] == "WARNING"


def test_database_trouble_is_logged_as_django_logs_it(db, caplog):
    records = {}
    with mock.patch.object(handlers, "ingest_messages", side_effect=OperationalError("gone")):
        for client_class in (Client, WsgiClient):
            caplog.clear()
            _answer(client_class, "stored")
            records[client_class] = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert records[WsgiClient] == records[Client]
    assert ("django.request", "ERROR", "Service Unavailable: /v1/track") in records[Client]


def _post_through_gunicorns_entry(tenant, body: bytes) -> int:
    """A POST as gunicorn makes it: request signals connected, as in production."""
    from kana.wsgi import application

    environ = Client()._base_environ(
        PATH_INFO="/v1/track",
        REQUEST_METHOD="POST",
        CONTENT_TYPE="application/json",
        CONTENT_LENGTH=str(len(body)),
        HTTP_AUTHORIZATION=tenant.basic(),
        **{"wsgi.input": __import__("io").BytesIO(body)},
    )
    started = []
    answer = application(environ, lambda status, headers: started.append(status))
    answer.close()
    return int(started[0].split()[0])


# PostgreSQL: Django never closes the in-memory SQLite test database, leaked transaction or not.
@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_failed_request_leaves_no_transaction_open():
    tenant = make_tenant()

    def fails_inside_a_transaction(**kwargs):
        connection.set_autocommit(False)  # a transaction the failing code leaves open
        Event.objects.exists()
        raise RuntimeError("boom")

    with mock.patch.object(handlers, "ingest_messages", side_effect=fails_inside_a_transaction):
        assert _post_through_gunicorns_entry(tenant, _json(TRACK)) == 500
    # request_finished ran close_old_connections: the connection left in a transaction is gone.
    assert connection.connection is None
    assert _post_through_gunicorns_entry(tenant, _json(TRACK)) == 200
    assert Event.objects.count() == 1


# --- The request signals' work on the lean path (kana.lean._Signals) -----------------------
# With Django's own receivers alone (as in production and here: pytest-django leaves them
# connected) the front does their work itself; these pin that the work still happens.


@pytest.mark.django_db(transaction=True)  # the request's close_old_connections would end a test's transaction
def test_a_request_clears_the_query_log_and_leaves_no_urlconf_set():
    from django.urls import get_urlconf

    from kana.wsgi import application

    tenant = make_tenant()
    connection.ensure_connection()
    connection.queries_log.append({"sql": "left by an earlier request", "time": "0.000"})
    assert _post_through_gunicorns_entry(tenant, _json(TRACK)) == 200
    assert not any(q["sql"] == "left by an earlier request" for q in connection.queries_log)  # reset_queries

    # A request Django answers (a GET: 405) sets the URLconf and its end resets it; a lean
    # request after it finds none set and sets none.
    environ = Client()._base_environ(PATH_INFO="/v1/track", REQUEST_METHOD="GET")
    application(environ, lambda status, headers: None).close()
    assert get_urlconf() is None
    assert _post_through_gunicorns_entry(tenant, _json({**TRACK, "messageId": "m-2"})) == 200
    assert get_urlconf() is None


@pytest.mark.django_db(transaction=True)
def test_other_receivers_get_the_signals_and_djangos_work_still_happens():
    from django.core.signals import request_finished, request_started
    from django.urls import get_urlconf, set_urlconf

    tenant = make_tenant()
    got = []

    def started(sender, environ, **kwargs):
        got.append(("started", sender, environ["PATH_INFO"]))

    def finished(sender, **kwargs):
        got.append(("finished", sender))

    request_started.connect(started)
    request_finished.connect(finished)
    set_urlconf("left.by.an.earlier.request")
    try:
        assert _post_through_gunicorns_entry(tenant, _json(TRACK)) == 200
        assert get_urlconf() is None  # Django's receivers ran too
    finally:
        request_started.disconnect(started)
        request_finished.disconnect(finished)
        set_urlconf(None)
    assert [entry[0] for entry in got] == ["started", "finished"]
    assert got[0][2] == "/v1/track" and got[0][1] is got[1][1] and issubclass(got[0][1], LeanApp)
    # Disconnected again: the next request sends them to nobody else.
    assert _post_through_gunicorns_entry(tenant, _json({**TRACK, "messageId": "m-2"})) == 200
    assert len(got) == 2


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_connection_past_conn_max_age_is_closed_before_and_after_a_lean_request():
    import time

    tenant = make_tenant()
    assert _post_through_gunicorns_entry(tenant, _json(TRACK)) == 200
    old = connection.connection
    assert old is not None and connection.close_at is not None  # persistent (CONN_MAX_AGE)

    # Past its age when the request starts: closed first, the request runs on a new one.
    connection.close_at = time.monotonic() - 1
    assert _post_through_gunicorns_entry(tenant, _json({**TRACK, "messageId": "m-2"})) == 200
    assert old.closed and connection.connection is not None and connection.connection is not old

    # Past its age by the time the request ends: closed when it ends.
    ingest = handlers.ingest_messages

    def ages_the_connection(**kwargs):
        outcomes = ingest(**kwargs)
        connection.close_at = time.monotonic() - 1
        return outcomes

    with mock.patch.object(handlers, "ingest_messages", side_effect=ages_the_connection):
        assert _post_through_gunicorns_entry(tenant, _json({**TRACK, "messageId": "m-3"})) == 200
    assert connection.connection is None
    assert Event.objects.count() == 3


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_threads_first_request_closes_at_its_end_the_connection_it_opened_once_past_its_age():
    # The front's end walks the connections its start found open when those were all of them;
    # a thread's first request finds none: the one it opens must still be looked at when it ends.
    import threading
    import time

    from django.db import connections

    tenant = make_tenant()
    ingest = handlers.ingest_messages
    seen = {}

    def ages_the_connection(**kwargs):
        outcomes = ingest(**kwargs)
        connection.close_at = time.monotonic() - 1
        return outcomes

    def first_request_of_a_thread():
        try:
            seen["open before"] = connections.all(initialized_only=True)
            seen["status"] = _post_through_gunicorns_entry(tenant, _json(TRACK))
            seen["open after"] = connection.connection
        finally:
            connections.close_all()

    with mock.patch.object(handlers, "ingest_messages", side_effect=ages_the_connection):
        thread = threading.Thread(target=first_request_of_a_thread)
        thread.start()
        thread.join()
    assert seen["open before"] == [] and seen["status"] == 200
    assert seen["open after"] is None  # opened by the request, past its age at its end: closed
    assert Event.objects.count() == 1
