"""The WSGI entry of gunicorn (``kana.wsgi:application``): Django's handler, with the lean
ingest app in front of it when ``settings.KANA_INGEST_WSGI_APP`` names one.

The app is named by a setting and imported by path (as Django does for ``ROOT_URLCONF``)
because ``kana`` is the bottom layer and imports no app (import-linter)."""

import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.utils.module_loading import import_string

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kana.settings")
application = get_wsgi_application()

if settings.KANA_INGEST_WSGI_APP:
    application = import_string(settings.KANA_INGEST_WSGI_APP)(application)
