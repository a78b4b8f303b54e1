"""Segment-facing HTTP endpoints as Django views: the adapter of ``segment_ingest.handlers``.

These views keep the URLs, the OpenAPI description and the test client's route; in
production the lean WSGI app (``segment_ingest.wsgi``) answers the same POSTs through the
same handlers without Django's generic request handling. Methods other than POST are
answered here (405 with Allow, as JSON through ``kana.http_errors``) on both routes.
"""

from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from . import handlers


def _view(handler):
    """The Django view of a handler: the request's META and body in, its answer out."""

    def view(request):
        status, headers, body = handler(request.META, request.read)
        response = HttpResponse(body, status=status, content_type=handlers.CONTENT_TYPE)
        for name, value in headers:
            response[name] = value
        return response

    view.__name__ = view.__qualname__ = handler.__name__
    view.__doc__ = handler.__doc__
    return csrf_exempt(require_POST(view))


segment_events = _view(handlers.segment_events)
batch = _view(handlers.batch)


def typed_endpoint(message_type: str):
    return _view(handlers.HANDLERS_BY_PATH[f"/v1/{message_type}"])
