"""Kana's URLs plus the B-insert baseline; used only by the benchmark (bench.settings)."""

from django.urls import path

from kana.urls import urlpatterns as kana_urlpatterns

from . import baseline

urlpatterns = [
    path("bench/insert/<int:workspace_id>", baseline.insert_event, name="bench-insert"),
    *kana_urlpatterns,
]
