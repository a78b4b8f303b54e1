from django.apps import AppConfig


class SegmentIngestConfig(AppConfig):
    name = "segment_ingest"
