"""Answers for when the database cannot be reached: 503 with Retry-After, never a 500.

Ingest maps database trouble itself (``segment_ingest.views``: 429 or 503, what Segment
retries). Everything else (the REST API, the dashboard) comes through here: a view (DRF
re-raises what its exception handler does not know) that failed on OperationalError or
InterfaceError answers 503 JSON under ``/api/`` and a small 503 page elsewhere. The page is
plain HTML with no template context: rendering the dashboard's base would need the database.
"""

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse

from .errors import error_body

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "5"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kana is unavailable</title></head>
<body><h1>Kana is temporarily unavailable</h1>
<p>Its database cannot be reached right now. Please try again in a few seconds.</p></body></html>
"""


class DatabaseUnavailableMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        return database_unavailable_response(request, exception)


def database_unavailable_response(request, exception: Exception) -> HttpResponse:
    """503 with Retry-After: JSON for the API and Segment's endpoints (``kana.http_errors``
    answers their errors through it), a small page elsewhere."""
    logger.error("database unavailable", extra={"path": request.path, "error": type(exception).__name__})
    if request.path.startswith(("/api/", "/v1/", "/segment/")):  # the sections that answer JSON
        response = JsonResponse(
            error_body("database_unavailable", "Kana's database is unavailable; retry shortly"), status=503
        )
    else:
        response = HttpResponse(_PAGE, status=503, content_type="text/html; charset=utf-8")
    response["Retry-After"] = RETRY_AFTER_SECONDS
    return response
