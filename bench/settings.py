"""Kana's settings plus the B-insert baseline URL: what the benchmark's gunicorn serves.

The app is served exactly as in production; only the URL conf differs, by one extra path,
so the baseline and the scenarios run on the same server, workers and database settings.
"""

from kana.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"
