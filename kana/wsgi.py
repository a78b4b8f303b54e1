"""The WSGI entry of gunicorn (``kana.wsgi:application``): Django's handler, with the lean
front (``kana.lean.LeanApp``) in front of it when ``settings.KANA_LEAN_ROUTES`` names route
tables.

The tables are named by a setting and imported by path (as Django does for ``ROOT_URLCONF``)
because ``kana`` is the bottom layer and imports no app (import-linter)."""

import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.utils.module_loading import import_string

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kana.settings")
application = get_wsgi_application()

if settings.KANA_LEAN_ROUTES:
    from kana.lean import LeanApp  # after Django's set-up: it reads the settings' apps

    application = LeanApp(
        application, {path: route for name in settings.KANA_LEAN_ROUTES for path, route in import_string(name).items()}
    )
