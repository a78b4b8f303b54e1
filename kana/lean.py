"""The lean WSGI front: hot endpoints answered without Django's generic request handling.

A plain Django view costs more Python per request (request and response objects, URL
resolution, nine middleware, and for the REST API DRF's dispatch) than Kana's own work on a
track message or an entitlement check. ``LeanApp`` sits in front of Django's WSGI handler
(``kana.wsgi`` builds it from the route tables ``settings.KANA_LEAN_ROUTES`` names: ``kana``
imports no app) and answers a request to one of those routes itself, through the same code
as the Django views; it hands everything else to Django unchanged: other paths and methods,
a request the route does not claim (``Route.claims``: e.g. an ``Accept`` the browsable API
would answer), a Host that ``ALLOWED_HOSTS`` may refuse (Django answers 400), and every
request when a setting makes the middleware's answer depend on the request (HTTPS redirect,
HSTS, ``PREPEND_WWW``, ``DISALLOWED_USER_AGENTS``, ``ATOMIC_REQUESTS``).

What Django's handler does that still matters is kept: ``request_started`` before and
``request_finished`` after (``close_old_connections``: ``CONN_MAX_AGE``, the health check,
a connection left in a transaction or broken is closed; while only Django's own receivers are
connected, the front does their work itself: ``_Signals``), the response headers the middleware
adds (taken from the middleware themselves, once per settings), the ``django.request`` log
record of a 4xx or 5xx answer, and an unexpected exception answered as the logged JSON 500
the Django route gives (``kana.http_errors``).
"""

import io
import weakref
from collections.abc import Callable, Mapping
from typing import NamedTuple

from django.conf import settings
from django.core.cache import caches, close_caches
from django.core.cache.backends.base import BaseCache
from django.core.exceptions import DisallowedHost
from django.core.handlers.base import reset_urlconf
from django.core.handlers.exception import response_for_exception
from django.core.handlers.wsgi import WSGIRequest
from django.core.signals import request_finished, request_started, setting_changed
from django.db import close_old_connections, connections, reset_queries
from django.http import HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils.log import log_response
from django.utils.module_loading import import_string

from .http_errors import as_json_error

CONTENT_TYPE = "application/json"  # every lean answer is JSON, as the Django routes' are

# Settings under which the middleware answer a request differently per request (or not at
# all): the lean front then steps aside and Django answers everything.
_REQUEST_DEPENDENT = ("SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "PREPEND_WWW", "DISALLOWED_USER_AGENTS")
_HOSTS_REMEMBERED = 256  # distinct Host headers whose check is cached; others are checked each time

Environ = Mapping[str, object]
Reader = Callable[[int], bytes]
# (status, extra headers, JSON body): the Content-Type, Content-Length and the middleware's
# headers are the front's.
Answer = tuple[int, tuple[tuple[str, str], ...], bytes]


class Route(NamedTuple):
    """What a lean path answers: one method, through ``handler(environ, read)``.

    ``claims(environ)``, when given, may leave a request of that method to Django (one the
    handler could not answer exactly as the Django view does)."""

    method: str
    handler: Callable[[Environ, Reader], Answer]
    claims: Callable[[Environ], bool] | None = None


_STATUS_LINES = {}


def _status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"{status} {HttpResponse(status=status).reason_phrase}"
    return line


# The receivers Django itself connects to the request signals (django.db, django.core.cache,
# django.core.handlers.base): all production has (any other receiver makes the front send the
# signal).
_DJANGOS_STARTED = frozenset((reset_queries, close_old_connections))
_DJANGOS_FINISHED = frozenset((close_old_connections, close_caches, reset_urlconf))
_ANY_SENDER = id(None)  # the lookup key's sender part of a receiver connected for every sender


def _only_djangos(receivers: list, djangos: frozenset) -> bool:
    """Whether a signal's receivers are exactly Django's own, connected for any sender (a test
    client that disconnects one of them gets the signal sent, without that one)."""
    found = set()
    for (_, sender_key), receiver, is_async in receivers:
        if isinstance(receiver, weakref.ReferenceType):
            receiver = receiver()  # as Django resolves it; a dead one is not Django's
        if is_async or sender_key != _ANY_SENDER or receiver not in djangos:
            return False
        found.add(receiver)
    return len(receivers) == len(djangos) and found == djangos


class _Signals:
    """``request_started`` and ``request_finished`` for a lean request, their receivers'
    work done directly while only Django's own are connected (the two dispatches, three
    ``connections.all()`` and a ``caches.all()``, each a walk through asgiref's ``Local``, were
    24 µs a request measured alone, 8 µs this way: docs/performance-history.md, "Round 15: s1lean").

    What those receivers do, done here in their order: at the start, every open connection's
    query log cleared (``reset_queries``) and the connection closed if it is past
    ``CONN_MAX_AGE``, broken, left outside autocommit or failed its check after an error
    (``close_if_unusable_or_obsolete``, which also re-arms the health check); at the end the
    same close and every open cache closed (only when a configured backend's ``close`` does
    something: ``BaseCache.close`` does nothing). ``reset_urlconf`` is not needed: it undoes
    the ``set_urlconf`` of Django's handler at the start of a Django request (whose own end
    resets it), and a lean request sets none (≈ 3 µs a track, another ``Local``). Any other
    receiver connected (a test's, a library's) and the signal is sent as Django sends it. The
    receivers are compared per request: the list is remembered with its verdict, and a list
    equal to the remembered one (the same entries: ``==`` compares them by identity first)
    has the same verdict."""

    def __init__(self):
        self.seen_started: tuple[list, bool] = ([], False)
        self.seen_finished: tuple[list, bool] = ([], False)
        self.configure()

    def configure(self):
        self.caches_close = any(
            import_string(cache["BACKEND"]).close is not BaseCache.close for cache in settings.CACHES.values()
        )

    def _only_djangos(self, signal, seen_attribute: str, djangos) -> bool:
        """Whether only Django's ``djangos`` receive ``signal``, from the verdict remembered in
        ``seen_attribute`` while its receivers are the same list."""
        receivers = signal.receivers
        seen, plain = getattr(self, seen_attribute)
        if receivers != seen:
            plain = _only_djangos(receivers, djangos)
            setattr(self, seen_attribute, (list(receivers), plain))
        return plain

    def started(self, sender, environ) -> list | None:
        """The request's start; returns the connections it found open when they are all the
        configured ones (for ``finished``), else None."""
        if not self._only_djangos(request_started, "seen_started", _DJANGOS_STARTED):
            request_started.send(sender=sender, environ=environ)
            return None
        opened = connections.all(initialized_only=True)
        for db in opened:
            db.queries_log.clear()
            db.close_if_unusable_or_obsolete()
        # Every configured connection's wrapper exists already (a thread's requests after its
        # first): none can appear during the request, and a closed one keeps its wrapper, so
        # the end walks this same list instead of asking asgiref's ``Local`` again.
        return opened if len(opened) == len(connections.settings) else None

    def finished(self, sender, opened: list | None = None) -> None:
        """The request's end; ``opened``: what ``started`` returned."""
        if not self._only_djangos(request_finished, "seen_finished", _DJANGOS_FINISHED):
            request_finished.send(sender=sender)
            return
        for db in connections.all(initialized_only=True) if opened is None else opened:
            db.close_if_unusable_or_obsolete()
        if self.caches_close:
            for cache in caches.all(initialized_only=True):
                cache.close()


class _Body(list):
    """The answer's body; the WSGI server calls ``close`` once it is sent, which ends the
    request as Django's ``HttpResponse.close`` does."""

    __slots__ = ("sender", "signals", "opened")

    def close(self):
        self.signals.finished(self.sender, self.opened)


class LeanApp:
    def __init__(self, django_app, routes: Mapping[str, Route]):
        self.django_app = django_app
        self.routes = dict(routes)
        self.signals = _Signals()
        self._configure()
        setting_changed.connect(self._settings_changed, weak=False)

    def _settings_changed(self, **kwargs):
        self._configure()

    def _configure(self):
        self.enabled = not any(getattr(settings, name) for name in _REQUEST_DEPENDENT) and not any(
            db.get("ATOMIC_REQUESTS") for db in settings.DATABASES.values()
        )
        self.hosts: dict[tuple, bool] = {}
        self.headers = self._middleware_headers()
        self.signals.configure()

    @staticmethod
    def _middleware_headers() -> tuple[tuple[str, str], ...]:
        """The headers Django's middleware add to a JSON answer, asked of the middleware
        themselves (a plain HTTP request: HSTS and the HTTPS redirect disable this path)."""
        probe = HttpResponse(content_type=CONTENT_TYPE)
        before = set(probe.headers)
        request = WSGIRequest({"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/track", "wsgi.input": io.BytesIO()})
        for middleware in (SecurityMiddleware, XFrameOptionsMiddleware):
            if f"{middleware.__module__}.{middleware.__name__}" in settings.MIDDLEWARE:
                middleware(lambda request: probe).process_response(request, probe)
        return tuple((name, value) for name, value in probe.items() if name not in before)

    def _host_allowed(self, environ) -> bool:
        """Whether Django would accept the request's host (``ALLOWED_HOSTS``), remembered per
        host so that the common case is a dictionary lookup."""
        key = (
            environ.get("HTTP_X_FORWARDED_HOST"),
            environ.get("HTTP_HOST"),
            environ.get("SERVER_NAME"),
            environ.get("SERVER_PORT"),
        )
        allowed = self.hosts.get(key)
        if allowed is None:
            try:
                WSGIRequest(environ).get_host()
                allowed = True
            except DisallowedHost:
                allowed = False
            if len(self.hosts) < _HOSTS_REMEMBERED:
                self.hosts[key] = allowed
        return allowed

    def __call__(self, environ, start_response):
        route = self.routes.get(environ.get("PATH_INFO"))
        if (
            route is None
            or environ.get("REQUEST_METHOD") != route.method
            or not self.enabled
            or (route.claims is not None and not route.claims(environ))
            or not self._host_allowed(environ)
        ):
            return self.django_app(environ, start_response)

        opened = self.signals.started(self.__class__, environ)
        try:
            status, extra, body = route.handler(environ, reader(environ))
            if status >= 400:
                _log_refusal(environ, status)
        except Exception as exc:  # noqa: BLE001 - answered as Django answers it: logged, JSON 500
            status, extra, body = self._server_error(environ, exc)
        headers = [
            ("Content-Type", CONTENT_TYPE),
            *extra,
            ("Content-Length", str(len(body))),
            *self.headers,
        ]
        start_response(_status_line(status), headers)
        answer = _Body((body,))
        answer.sender = self.__class__
        answer.signals = self.signals
        answer.opened = opened
        return answer

    @staticmethod
    def _server_error(environ, exc: Exception) -> Answer:
        # Django's own answer (logging, got_request_exception, handler500), as the Django
        # route's ``json_errors_view`` gives it; ``response_for_exception`` reads the
        # exception being handled, so this runs inside the caller's ``except``.
        request = WSGIRequest(environ)
        return answer_of(as_json_error(request, response_for_exception(request, exc)))


def answer_of(response: HttpResponse) -> Answer:
    """A rendered Django response as a lean answer (its Content-Type is the front's)."""
    extra = tuple((name, value) for name, value in response.items() if name not in ("Content-Type",))
    return response.status_code, extra, response.content


def _log_refusal(environ, status: int) -> None:
    """The ``django.request`` record Django's handler writes for a 4xx (warning) or 5xx
    (error) answer, so that logs read the same whichever route answered."""
    response = HttpResponse(status=status)
    request = WSGIRequest(environ)
    log_response("%s: %s", response.reason_phrase, request.path, response=response, request=request)


def reader(environ) -> Reader:
    """``read(n)`` over the body, never past the declared Content-Length (as Django's
    ``LimitedStream``: no or a bad Content-Length reads nothing)."""
    try:
        remaining = int(environ.get("CONTENT_LENGTH"))
    except (ValueError, TypeError):
        remaining = 0
    stream = environ["wsgi.input"]

    def read(size: int) -> bytes:
        return stream.read(min(size, remaining)) if remaining > 0 else b""

    return read
