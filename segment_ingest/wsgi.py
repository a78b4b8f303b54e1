"""Segment's ingest POSTs on the lean WSGI front (``kana.lean``), without Django's generic
request handling.

Ingest is the hot path, and a plain Django view costs more Python per request than Kana's own
work on a track message. ``ROUTES`` gives the front a POST route per ingest path, answered by
the same handlers as the Django views (``segment_ingest.handlers``); ``settings.KANA_LEAN_ROUTES``
names it. Other methods (405 with Allow) and paths go to Django.
"""

from kana.lean import LeanApp, Route

from .handlers import HANDLERS_BY_PATH

ROUTES = {path: Route("POST", handler) for path, handler in HANDLERS_BY_PATH.items()}


class LeanIngestApp(LeanApp):
    """The front with the ingest routes alone."""

    def __init__(self, django_app):
        super().__init__(django_app, ROUTES)
