"""The lean front (api.lean) answers the entitlement check and consume exactly as DRF's views do.

Each case sends the same request to a fresh workspace, set up the same way, through each route
(Django's test client, and gunicorn's entry kana.wsgi.application) and compares status,
headers and body. Every check and consume test also runs on both routes (the api_route fixture).
"""

import json
from unittest import mock

import pytest
from django.db import OperationalError
from django.test import Client
from rest_framework.exceptions import ValidationError

from api import entitlement_serializers as s
from api import lean
from api.base import validated
from entitlements import access
from features.models import FeatureType, Usage

from .api_support import ApiClient, feature, identify
from .conftest import make_tenant
from .entitlement_support import package, subscribe
from .wsgi_client import WsgiClient

CHECK = "/api/v1/entitlements/check"
CONSUME = "/api/v1/entitlements/consume"
# A fixed anchor, so that both workspaces' periods (in the answers) are the same.
ANCHOR = "2025-01-01T00:00:00Z"


def _setup(tenant, *, limit=2, spent=0):
    """Feature ``messages``; ``u1`` on a package of ``limit``, with ``spent`` consumed (keys s<n>)."""
    feature(tenant, "messages")
    feature(tenant, "sso", type=FeatureType.BINARY)
    identify(tenant, "u1")
    package(tenant, "plan", {"feature": "messages", "limit": limit}, {"feature": "sso"})
    subscribe(tenant, "plan", user_id="u1", started_at=ANCHOR)
    for n in range(spent):
        response = ApiClient(tenant).post(
            "entitlements/consume", {"user_id": "u1", "feature": "messages", "idempotency_key": f"s{n}"}
        )
        assert response.json()["recorded"] is True


def _body(**fields) -> bytes:
    return json.dumps({"user_id": "u1", "feature": "messages", "delta": 1, "idempotency_key": "k1", **fields}).encode()


def _bearer(tenant):
    return {"HTTP_AUTHORIZATION": f"Bearer {tenant.key}"}


# name: (method, path, query or body, headers given the tenant, set-up options)
CASES = {
    "check ok": ("get", CHECK, {"user_id": "u1", "feature": "messages"}, _bearer, {}),
    "check delta": ("get", CHECK, {"user_id": "u1", "feature": "messages", "delta": "1.5"}, _bearer, {}),
    "check limit reached": ("get", CHECK, {"user_id": "u1", "feature": "messages"}, _bearer, {"spent": 2}),
    "check binary": ("get", CHECK, {"user_id": "u1", "feature": "sso"}, _bearer, {}),
    "check unknown user": ("get", CHECK, {"user_id": "ghost", "feature": "messages"}, _bearer, {}),
    "check unknown group": ("get", CHECK, {"group_id": "ghosts", "feature": "messages"}, _bearer, {}),
    "check unknown feature": ("get", CHECK, {"user_id": "u1", "feature": "nope"}, _bearer, {}),
    "check no subject": ("get", CHECK, {"feature": "messages"}, _bearer, {}),
    "check bad delta": ("get", CHECK, {"user_id": "u1", "feature": "messages", "delta": "x"}, _bearer, {}),
    "check negative delta": ("get", CHECK, {"user_id": "u1", "feature": "messages", "delta": "-1"}, _bearer, {}),
    "check huge delta": ("get", CHECK, {"user_id": "u1", "feature": "messages", "delta": "1e30"}, _bearer, {}),
    "check missing feature": ("get", CHECK, {"user_id": "u1"}, _bearer, {}),
    "check non-ascii": ("get", CHECK, {"user_id": "ü ✓", "feature": "messages"}, _bearer, {}),
    "check basic auth": (
        "get",
        CHECK,
        {"user_id": "u1", "feature": "messages"},
        lambda t: {"HTTP_AUTHORIZATION": t.basic()},
        {},
    ),
    "check no key": ("get", CHECK, {"user_id": "u1", "feature": "messages"}, lambda t: {}, {}),
    "check bad key": (
        "get",
        CHECK,
        {"user_id": "u1", "feature": "messages"},
        lambda t: {"HTTP_AUTHORIZATION": "Bearer nope"},
        {},
    ),
    "check accept json": (
        "get",
        CHECK,
        {"user_id": "u1", "feature": "messages"},
        lambda t: {**_bearer(t), "HTTP_ACCEPT": "application/json"},
        {},
    ),
    "check accept indent": (
        "get",
        CHECK,
        {"user_id": "u1", "feature": "messages"},
        lambda t: {**_bearer(t), "HTTP_ACCEPT": "application/json; indent=2"},
        {},
    ),
    "check accept none": (
        "get",
        CHECK,
        {"user_id": "u1", "feature": "messages"},
        lambda t: {**_bearer(t), "HTTP_ACCEPT": "text/csv"},
        {},
    ),
    "check format": ("get", CHECK, {"user_id": "u1", "feature": "messages", "format": "json"}, _bearer, {}),
    "check post": ("post", CHECK, _body(), _bearer, {}),
    "check head": ("head", CHECK, {"user_id": "u1", "feature": "messages"}, _bearer, {}),
    "check options": ("options", CHECK, b"", _bearer, {}),
    "check slash": ("get", CHECK + "/", {"user_id": "u1", "feature": "messages"}, _bearer, {}),
    "consume ok": ("post", CONSUME, _body(), _bearer, {}),
    "consume fraction": ("post", CONSUME, _body(delta=0.25), _bearer, {}),
    "consume replay": ("post", CONSUME, _body(idempotency_key="s0"), _bearer, {"spent": 1}),
    "consume over limit": ("post", CONSUME, _body(), _bearer, {"spent": 2}),
    "consume unknown user": ("post", CONSUME, _body(user_id="ghost"), _bearer, {}),
    "consume unknown feature": ("post", CONSUME, _body(feature="nope"), _bearer, {}),
    "consume bad delta": ("post", CONSUME, _body(delta="1"), _bearer, {}),
    "consume negative delta": ("post", CONSUME, _body(delta=-1), _bearer, {}),
    "consume missing key": (
        "post",
        CONSUME,
        json.dumps({"user_id": "u1", "feature": "messages"}).encode(),
        _bearer,
        {},
    ),
    "consume invalid json": ("post", CONSUME, b"{nope", _bearer, {}),
    "consume nan": (
        "post",
        CONSUME,
        b'{"user_id": "u1", "feature": "messages", "delta": NaN, "idempotency_key": "k"}',
        _bearer,
        {},
    ),
    "consume not an object": ("post", CONSUME, b"[1]", _bearer, {}),
    "consume null": ("post", CONSUME, b"null", _bearer, {}),
    "consume empty body": ("post", CONSUME, b"", _bearer, {}),
    "consume no key": ("post", CONSUME, _body(), lambda t: {}, {}),
    "consume bad key": ("post", CONSUME, _body(), lambda t: {"HTTP_AUTHORIZATION": "Basic !!"}, {}),
    "consume get": ("get", CONSUME, {}, _bearer, {}),
    "consume put": ("put", CONSUME, _body(), _bearer, {}),
}


def _answer(client_class, case: str, *, content_type="application/json", prepare=None, **client_options):
    method, path, data, headers, setup = CASES[case]
    tenant = make_tenant(f"{case} via {client_class.__name__}")
    _setup(tenant, **setup)
    if prepare:
        prepare(tenant)
    client = client_class(**client_options)
    if method in ("get", "head"):
        response = getattr(client, method)(path, data, **headers(tenant))
    else:
        response = client.generic(method.upper(), path, data, content_type=content_type, **headers(tenant))
    return response.status_code, dict(response.headers), response.content


def _same_answer(case: str, **options):
    django = _answer(Client, case, **options)
    lean_ = _answer(WsgiClient, case, **options)
    if CASES[case][0] == "head":
        # Django's test client drops a HEAD answer's body, as the WSGI server does; a WSGI
        # app (and so WsgiClient) leaves it to the server.
        lean_ = (*lean_[:2], b"")
    assert lean_ == django
    return lean_


@pytest.mark.parametrize("case", CASES)
def test_it_answers_as_the_drf_view(db, case):
    status, headers, body = _same_answer(case)
    if CASES[case][0] not in ("head", "options"):
        assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"  # SecurityMiddleware's, on both routes
    if CASES[case][0] != "head":
        assert int(headers["Content-Length"]) == len(body)


def test_the_cases_cover_every_kind_of_answer(db):
    """The comparison above is only worth what its cases cover: ok, refusals, each error."""
    statuses = {case: _answer(WsgiClient, case)[0] for case in CASES}
    assert statuses["check ok"] == statuses["consume ok"] == statuses["consume over limit"] == 200
    assert statuses["check bad delta"] == statuses["consume invalid json"] == statuses["consume bad delta"] == 400
    assert statuses["check no key"] == statuses["consume bad key"] == 401
    assert statuses["consume get"] == statuses["check post"] == 405
    assert statuses["check accept none"] == 406


@pytest.mark.parametrize(
    "case",
    [
        "check ok",
        "check bad delta",
        "check no key",
        "check bad key",
        "consume ok",
        "consume replay",
        "consume invalid json",
        "consume missing key",
    ],
)
def test_it_answers_without_djangos_handler(db, case):
    from kana.wsgi import application

    with mock.patch.object(application, "django_app", side_effect=AssertionError("went through Django")):
        _answer(WsgiClient, case)


@pytest.mark.parametrize(
    "case",
    [
        "check accept indent",
        "check accept none",
        "check format",
        "check head",
        "check options",
        "check post",
        "consume empty body",
        "consume get",
    ],
)
def test_what_drf_would_negotiate_or_route_differently_is_left_to_django(db, case):
    from kana.wsgi import application

    with mock.patch.object(application, "django_app", side_effect=AssertionError("went through Django")):
        with pytest.raises(AssertionError, match="went through Django"):
            _answer(WsgiClient, case)


def test_a_browser_gets_drfs_page_and_a_charset_body_is_left_to_django(db):
    from kana.wsgi import application

    for case, options in [("check ok", {}), ("consume ok", {"content_type": "application/json; charset=latin-1"})]:
        with mock.patch.object(application, "django_app", side_effect=AssertionError("went through Django")):
            with pytest.raises(AssertionError, match="went through Django"):
                if case == "check ok":
                    tenant = make_tenant("browser")
                    WsgiClient().get(CHECK, {"feature": "x"}, HTTP_ACCEPT="text/html", **_bearer(tenant))
                else:
                    _answer(WsgiClient, case, **options)
    assert lean._drf_headers(CHECK) == (("Allow", "GET, HEAD, OPTIONS"), ("Vary", "Accept"))


def test_an_archived_feature_gets_the_same_409(db):
    def archive(tenant):
        assert ApiClient(tenant).patch("features/messages", {"archived": True}).status_code == 200

    status, _headers, body = _same_answer("consume ok", prepare=archive)
    assert status == 409 and json.loads(body)["code"] == "feature_archived"


def test_the_lean_consume_records_once(db):
    _answer(WsgiClient, "consume replay")
    assert Usage.objects.filter(event__message_id__in=["s0", "k1"]).count() == 1


@pytest.mark.parametrize("case", ["check ok", "consume ok"])
def test_database_trouble_gets_the_same_503(db, case):
    target = "check" if case == "check ok" else "consume"
    with mock.patch.object(access, target, side_effect=OperationalError("the server closed the connection")):
        status, headers, body = _same_answer(case)
    assert status == 503 and headers["Retry-After"] == "5"
    assert json.loads(body)["code"] == "database_unavailable"


@pytest.mark.parametrize("case", ["check ok", "consume ok"])
def test_an_unexpected_error_is_a_logged_json_500_without_a_traceback(db, caplog, case):
    target = "check" if case == "check ok" else "consume"
    with mock.patch.object(access, target, side_effect=RuntimeError("boom")):
        status, _headers, body = _same_answer(case, raise_request_exception=False)
    assert status == 500
    assert json.loads(body) == {
        "code": "server_error",
        "message": "something went wrong on Kana's side; it has been logged",
    }
    assert b"boom" not in body and b"Traceback" not in body
    assert [r for r in caplog.records if r.name == "django.request" and r.levelname == "ERROR"]


@pytest.mark.parametrize("case", ["check no key", "check bad delta", "consume invalid json", "consume bad key"])
def test_a_refusal_is_logged_as_django_logs_it(db, caplog, case):
    records = {}
    for client_class in (Client, WsgiClient):
        _answer(client_class, case)  # the set-up's own requests log nothing: all succeed
        caplog.clear()
        _answer_request_only(client_class, case)
        records[client_class] = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "django.request"]
    assert records[WsgiClient] == records[Client]
    assert len(records[Client]) == 1 and records[Client][0][0] == "WARNING"


def _answer_request_only(client_class, case):
    method, path, data, headers, _setup_options = CASES[case]
    tenant = make_tenant(f"log {case} via {client_class.__name__}")
    client = client_class()
    if method == "get":
        return client.get(path, data, **headers(tenant))
    return client.generic("POST", path, data, content_type="application/json", **headers(tenant))


def test_database_trouble_is_logged_as_django_logs_it(db, caplog):
    records = {}
    with mock.patch.object(access, "check", side_effect=OperationalError("gone")):
        for client_class in (Client, WsgiClient):
            tenant = make_tenant(f"db via {client_class.__name__}")
            caplog.clear()
            client_class().get(CHECK, {"user_id": "u1", "feature": "messages"}, **_bearer(tenant))
            records[client_class] = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert records[WsgiClient] == records[Client]
    assert ("django.request", "ERROR", f"Service Unavailable: {CHECK}") in records[Client]


@pytest.mark.parametrize("serializer_class", [s.CheckQuerySerializer, s.ConsumeSerializer])
def test_a_kept_serializer_validates_as_a_new_one(serializer_class):
    """``api.base.validated`` keeps one serializer per class and thread; each call must give
    what a new serializer gives, errors included, whatever the calls before it were."""
    inputs = [
        {"user_id": "u1", "feature": "messages", "delta": "2", "idempotency_key": "k"},
        {"user_id": "u1", "feature": "messages", "delta": 2, "idempotency_key": "k"},
        {"feature": "messages"},
        {"user_id": "u1", "feature": "messages", "delta": "-1", "idempotency_key": "k"},
        {},
        None,
        [1],
        {"user_id": "u1", "feature": "x" * 101, "delta": 1, "idempotency_key": "k"},
        {"user_id": "u2", "feature": "messages"},
    ]
    for data in inputs * 2:
        fresh = serializer_class(data=data)
        expected = fresh.validated_data if fresh.is_valid() else ValidationError(fresh.errors).detail
        try:
            got = validated(serializer_class, data)
        except ValidationError as exc:
            got = exc.detail
        assert got == expected, data


QUERIES = [
    "",
    "user_id=u1&feature=messages&delta=2",
    "feature=a&user_id=u1&feature=b",  # the last value, where the name first appeared
    "feature&user_id=&&delta",  # names without values, empty pairs
    "user+id=a+b&feature=%6D%65ssages%20x",  # '+' and percent escapes
    "feature=%E9%FF",  # escapes that are not UTF-8
    "feature=caf\xe9",  # a raw byte that is not UTF-8 (the environ's latin-1 text)
    "a=1;b=2",  # ';' does not separate
]


@pytest.mark.parametrize("query", QUERIES)
def test_the_query_is_read_as_djangos_querydict_reads_it(query):
    from django.core.handlers.wsgi import get_bytes_from_wsgi
    from django.http import QueryDict

    environ = {"QUERY_STRING": query}
    expected = QueryDict(get_bytes_from_wsgi(environ, "QUERY_STRING", "")).dict()
    got = lean._query(environ)
    assert got == expected and list(got) == list(expected)


def test_too_many_query_fields_are_refused_as_django_refuses_them(settings):
    from django.core.exceptions import TooManyFieldsSent
    from django.http import QueryDict

    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 2
    with pytest.raises(TooManyFieldsSent):
        QueryDict(b"a=1&b=2&c=3")
    with pytest.raises(TooManyFieldsSent):
        lean._query({"QUERY_STRING": "a=1&b=2&c=3"})
    assert lean._query({"QUERY_STRING": "a=1&b=2"}) == {"a": "1", "b": "2"}
