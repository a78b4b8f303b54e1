"""Error answers: JSON ``{"code", "message"}`` for machines, friendly pages for people.

The REST API (``/api/``) and Segment's endpoints (``/v1/``, ``/segment/``) promise JSON
errors whatever produced them: the view itself, a decorator such as ``require_POST`` (a 405
with an empty HTML body), DRF's browsable renderer (HTML errors for a client that accepts
``text/html``), an exception (500), or a path that matches nothing (404). ``json_errors``
wraps the URL patterns of those sections where they are declared (``kana/urls.py``), so the
format follows the URL tree; ``page_not_found`` and ``server_error`` are the project's
``handler404``/``handler500`` for what no view of a section answers.

Everything else (the dashboard) gets friendly HTML pages, never Django's debug pages for a
missing object: see ``dashboard.access``.
"""

from functools import wraps

from django.conf import settings
from django.core.handlers.exception import response_for_exception
from django.db import InterfaceError, OperationalError
from django.http import HttpResponsePermanentRedirect, HttpResponseServerError, JsonResponse
from django.template import loader
from django.urls import URLPattern, URLResolver, is_valid_path
from django.utils.http import escape_leading_slashes
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from .errors import error_body
from .middleware import database_unavailable_response

# Paths whose errors are JSON (also for paths under them that match nothing).
JSON_PREFIXES = ("/api/", "/v1/", "/segment/")
# Segment's endpoints answer their own errors with ``"success": false``; so do these.
SEGMENT_PREFIXES = ("/v1/", "/segment/")

# A code for every status Kana answers; views that know better send their own.
STATUS_CODES = {
    400: ("invalid_request", "the request is malformed or invalid"),
    401: ("not_authenticated", "send your Kana API key"),
    403: ("permission_denied", "this key may not do that"),
    404: ("not_found", "no such path or object"),
    405: ("method_not_allowed", "this path does not answer that method"),
    406: ("not_acceptable", "this path answers JSON only"),
    413: ("body_too_large", "the request body is too large"),
    415: ("unsupported_media_type", "unsupported request body media type"),
    429: ("throttled", "too many requests; retry shortly"),
    500: ("server_error", "something went wrong on Kana's side; it has been logged"),
    503: ("unavailable", "Kana is unavailable; retry shortly"),
}
# Headers that still mean something on the JSON answer.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate", "Vary")


def error_response(request, status: int, *, code: str | None = None, message: str | None = None) -> JsonResponse:
    default_code, default_message = STATUS_CODES.get(status, ("error", "the request failed"))
    extra = {"success": False} if request.path.startswith(SEGMENT_PREFIXES) else {}
    return JsonResponse({**extra, **error_body(code or default_code, message or default_message)}, status=status)


def _is_json(response) -> bool:
    return response.get("Content-Type", "").split(";")[0].strip().endswith("json")


def as_json_error(request, response):
    """The same error as JSON (status and meaningful headers kept); other responses unchanged."""
    if response.status_code < 400:
        return response
    if isinstance(response, Response) and not response.is_rendered and isinstance(response.data, dict):
        # A DRF error (already ``{"code", "message"}``, by the exception handler) about to be
        # rendered by whatever the client accepted, the browsable API's HTML included.
        response.accepted_renderer = JSONRenderer()
        response.accepted_media_type = JSONRenderer.media_type
        response.content_type = None  # from the renderer
        return response
    if _is_json(response):
        return response
    message = None
    if response.status_code == 405 and "Allow" in response:
        message = f"{request.method} is not allowed here; use {response['Allow']}"
    converted = error_response(request, response.status_code, message=message)
    for header in _KEPT_HEADERS:
        if header in response:
            converted[header] = response[header]
    return converted


def json_errors_view(view):
    """``view`` answering every error as JSON, exceptions included (a 500, logged as usual)."""

    @wraps(view)  # keeps csrf_exempt, and the DRF attributes the schema generator reads
    def wrapped(request, *args, **kwargs):
        try:
            response = view(request, *args, **kwargs)
        except (OperationalError, InterfaceError) as exc:
            response = database_unavailable_response(request, exc)  # 503: the client retries
        except Exception as exc:
            # What Django itself would answer (status, logging, got_request_exception), as JSON.
            response = response_for_exception(request, exc)
        return as_json_error(request, response)

    return wrapped


def json_errors(patterns: list) -> list:
    """URL patterns (``path``, ``include``d ones too) whose views answer every error as JSON."""
    wrapped = []
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            wrapped.append(
                URLResolver(
                    pattern.pattern,
                    json_errors(pattern.url_patterns),
                    pattern.default_kwargs,
                    pattern.app_name,
                    pattern.namespace,
                )
            )
        elif isinstance(pattern, URLPattern):
            view = json_errors_view(pattern.callback)
            wrapped.append(URLPattern(pattern.pattern, view, pattern.default_args, pattern.name))
        else:
            raise TypeError(f"not a URL pattern: {pattern!r}")
    return wrapped


@csrf_exempt  # answers 404 to any method; there is nothing to protect
def _slash_appended(request):
    """Like ``CommonMiddleware``'s APPEND_SLASH, a redirect for a GET of a slashless path whose
    slashed form exists (a catch-all pattern would otherwise hide it from the middleware)."""
    path = request.path_info
    if settings.APPEND_SLASH and request.method in ("GET", "HEAD") and not path.endswith("/"):
        match = is_valid_path(f"{path}/", getattr(request, "urlconf", None))
        if match and not getattr(match.func, "is_catch_all", False):
            return HttpResponsePermanentRedirect(escape_leading_slashes(request.get_full_path(force_append_slash=True)))
    return None


# csrf_exempt: a path that does not exist answers 404 whatever the method, not a CSRF 403.
@csrf_exempt
def no_such_path(request):
    """The last pattern of a JSON section: a JSON 404, in DEBUG too (no debug page)."""
    return _slash_appended(request) or error_response(request, 404)


@csrf_exempt
def no_such_page(request):
    """The last pattern of all: the dashboard's friendly 404, in DEBUG too (``make run``)."""
    return _slash_appended(request) or page_not_found(request)


no_such_path.is_catch_all = True  # kept by json_errors_view's functools.wraps
no_such_page.is_catch_all = True


def _wants_json(request) -> bool:
    return request.path.startswith(JSON_PREFIXES)


def page_not_found(request, exception=None):
    """``handler404``: JSON under the API and ingest paths, Kana's friendly page elsewhere."""
    if _wants_json(request):
        return error_response(request, 404)
    return defaults.page_not_found(request, exception, template_name="404.html")


def server_error(request):
    """``handler500``: JSON under the API and ingest paths, a static friendly page elsewhere.

    Rendered without context processors or database access: the error may be the database.
    """
    if _wants_json(request):
        return error_response(request, 500)
    return HttpResponseServerError(loader.get_template("500.html").render())
