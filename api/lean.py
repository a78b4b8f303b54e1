"""The entitlement check and consume on the lean WSGI front (``kana.lean``).

S6 and S7 are hot paths, and on them DRF's dispatch (authentication and permission classes,
content negotiation, the request wrapper, the response's rendering) and Django's middleware
cost more Python than the check itself. ``ROUTES`` (named by ``settings.KANA_LEAN_ROUTES``)
answers ``GET /api/v1/entitlements/check`` and ``POST /api/v1/entitlements/consume`` with the
same steps, in the same order, as the DRF views: the key through ``api.auth`` (401
``not_authenticated`` / ``invalid_api_key`` with ``WWW-Authenticate``), the body read as DRF's
``JSONParser`` reads it (``_parsed``), the parameters and the call through
``api.entitlement_requests`` (which the views call too), every refusal through the API's
exception handler, the answer as DRF's ``JSONRenderer`` renders it (``_rendered``), and the
``Allow``/``Vary`` headers asked of the DRF view itself. There are
no throttles on the API (``REST_FRAMEWORK`` names none).

A request whose answer DRF would negotiate differently (an ``Accept`` other than JSON or
``*/*``, a ``format`` parameter: the browsable API, ``indent``, 406), a body that is not plain
UTF-8 JSON with a Content-Length, a query in another charset, and any other method (HEAD,
OPTIONS, 405) are left to Django, which answers them as before.
"""

import io
from urllib.parse import parse_qsl, unquote_plus

from django.conf import settings
from django.core.exceptions import TooManyFieldsSent
from django.core.handlers.wsgi import WSGIRequest, get_bytes_from_wsgi
from django.core.signals import setting_changed
from django.db import InterfaceError, OperationalError
from django.urls import Resolver404, resolve
from rest_framework import exceptions
from rest_framework.compat import LONG_SEPARATORS, SHORT_SEPARATORS
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.utils import json

from kana import errors
from kana.lean import Answer, Route, answer_of
from kana.middleware import database_unavailable_response

from .auth import AUTHENTICATE_HEADER, exception_handler, workspace_for_authorization
from .entitlement_requests import check_answer, consume_answer
from .entitlement_views import EntitlementViewSet
from .errors import DomainError

CHECK_PATH = "/api/v1/entitlements/check"
CONSUME_PATH = "/api/v1/entitlements/consume"

# Accept headers DRF answers with its JSONRenderer and no media type parameters (absent: */*).
_JSON_ACCEPTS = frozenset({"*/*", "application/json"})
# Bodies DRF's JSONParser reads as UTF-8 (the request's charset, else DEFAULT_CHARSET).
_JSON_BODIES = frozenset({"application/json", "application/json; charset=utf-8"})

_renderer = JSONRenderer()
_render = _renderer.render
_parser = JSONParser()
# ``_renderer.render(data)`` for the answers the front claims (no ``indent``: their Accept has
# no parameters): ``json.dumps(cls=…)`` made a new encoder for every answer; this one is made
# once, with the same class and options (the renderer's are class attributes, read at import).
_encode = _renderer.encoder_class(
    ensure_ascii=_renderer.ensure_ascii,
    allow_nan=not _renderer.strict,
    separators=SHORT_SEPARATORS if _renderer.compact else LONG_SEPARATORS,
).encode
_parse_constant = json.strict_constant if _parser.strict else None


def _rendered(data) -> bytes:
    """``_render(data)``: the same bytes, \\u2028 and \\u2029 escaped as DRF escapes them."""
    if data is None:
        return b""
    return _encode(data).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def _parsed(body: bytes):
    """``_parser.parse`` of a UTF-8 body (DRF's ``JSONParser``: ``json.load`` of a codecs
    stream reader): a body that decodes is the same text either way, read here without the
    reader. A body it refuses (or that does not decode: the reader drops a truncated last
    character instead of refusing it) goes to DRF's parser, for its own answer."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_parse_constant)
    except ValueError:
        return _parser.parse(io.BytesIO(body), None, {"encoding": "utf-8"})


def _negotiates_plain_json(environ) -> bool:
    accept = environ.get("HTTP_ACCEPT")
    if accept is not None and accept not in _JSON_ACCEPTS:
        return False
    # ``?format=`` picks DRF's renderer (URL_FORMAT_OVERRIDE); the query is decoded first, so
    # ``form%61t`` is found too. A false positive only sends the request to Django.
    return "format" not in unquote_plus(environ.get("QUERY_STRING", ""))


def _claims_check(environ) -> bool:
    # A charset in the Content-Type is the one Django decodes the query string with.
    return (
        _negotiates_plain_json(environ)
        and "charset" not in environ.get("CONTENT_TYPE", "").lower()
        and _drf_headers(CHECK_PATH) is not None
    )


def _claims_consume(environ) -> bool:
    if environ.get("CONTENT_TYPE") not in _JSON_BODIES or not _negotiates_plain_json(environ):
        return False
    # No or an empty body: DRF reads it as {} without its parser; Django answers those.
    length = environ.get("CONTENT_LENGTH")
    return bool(length) and length.isdigit() and int(length) > 0 and _drf_headers(CONSUME_PATH) is not None


_view_headers: dict[str, tuple[tuple[str, str], ...] | None] = {}


def _drf_headers(path: str) -> tuple[tuple[str, str], ...] | None:
    """The headers DRF's view of ``path`` adds to every answer it gives (``Allow``, ``Vary``),
    asked of the view as DRF's ``as_view`` sets it up; None when the URL conf does not route
    ``path`` to that view (the front then leaves the request to Django). Remembered per URL conf."""
    if path in _view_headers:
        return _view_headers[path]
    try:
        func = resolve(path).func
    except Resolver404:
        func = None
    headers = None
    if getattr(func, "cls", None) is EntitlementViewSet:
        view = func.cls(**func.initkwargs)
        actions = dict(func.actions)
        if "get" in actions:
            actions.setdefault("head", actions["get"])  # as DRF's as_view does
        for method, action in actions.items():
            setattr(view, method, getattr(view, action))
        headers = tuple(view.default_response_headers.items())
    _view_headers[path] = headers
    return headers


def _forget_view_headers(*, setting, **kwargs):
    if setting in ("ROOT_URLCONF", "REST_FRAMEWORK"):
        _view_headers.clear()


setting_changed.connect(_forget_view_headers)


def _answered(environ, respond) -> Answer:
    """``respond(workspace)``'s data as DRF's view answers it, or the refusal it answers."""
    headers = _drf_headers(environ["PATH_INFO"])
    try:
        found = workspace_for_authorization(environ.get("HTTP_AUTHORIZATION", ""))
        if found is None:
            raise exceptions.NotAuthenticated()
        return 200, headers, _rendered(respond(found[0]))
    except (OperationalError, InterfaceError) as exc:
        # DRF re-raises these; the URL conf's json_errors_view answers 503 with Retry-After.
        return answer_of(database_unavailable_response(WSGIRequest(environ), exc))
    except Exception as exc:
        refusal = _refusal(exc)
        if refusal is None:
            raise  # the front answers it as Django does: the logged JSON 500
        status, extra, body = refusal
        return status, (*extra, *headers), body


def _refusal(exc: Exception) -> Answer | None:
    """What ``WorkspaceViewSet.handle_exception`` and DRF's ``handle_exception`` answer for
    ``exc`` through the API's exception handler; None for an exception they re-raise."""
    if isinstance(exc, errors.DomainError):
        exc = DomainError.from_service(exc)
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        exc.auth_header = AUTHENTICATE_HEADER
    response = exception_handler(exc, {})
    if response is None:
        return None
    extra = tuple((name, value) for name, value in response.items() if name != "Content-Type")
    return response.status_code, extra, _render(response.data)


def _query(environ) -> dict:
    """``request.query_params.dict()``: the query decoded as ``QueryDict`` decodes it (the
    same ``parse_qsl`` call, the same fallback charset and field limit), each name with its
    last value, in the order of their first appearance, without building the ``QueryDict``
    (its per-value ``appendlist`` and text checks were ≈ 7 µs of a check's 11 here)."""
    raw = get_bytes_from_wsgi(environ, "QUERY_STRING", "")
    try:
        text = raw.decode(settings.DEFAULT_CHARSET)
    except UnicodeDecodeError:
        text = raw.decode("iso-8859-1")  # as QueryDict: "some user agents are misbehaving"
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            encoding=settings.DEFAULT_CHARSET,
            max_num_fields=settings.DATA_UPLOAD_MAX_NUMBER_FIELDS,
        )
    except ValueError as exc:  # QueryDict's reading of it: too many fields
        raise TooManyFieldsSent(
            "The number of GET/POST parameters exceeded settings.DATA_UPLOAD_MAX_NUMBER_FIELDS."
        ) from exc
    return dict(pairs)


def check(environ, read) -> Answer:
    return _answered(environ, lambda workspace: check_answer(workspace, _query(environ)))


def consume(environ, read) -> Answer:
    def respond(workspace):
        body = read(int(environ["CONTENT_LENGTH"]))
        return consume_answer(workspace, _parsed(body))

    return _answered(environ, respond)


ROUTES = {
    CHECK_PATH: Route("GET", check, _claims_check),
    CONSUME_PATH: Route("POST", consume, _claims_consume),
}
