from django.urls import path

from . import schema, views

urlpatterns = [
    path("segment/events", views.segment_events, name="segment-events"),
    path("v1/batch", views.batch, name="segment-batch"),
    path("v1/import", views.batch, name="segment-import"),
    *[
        path(f"v1/{message_type}", views.typed_endpoint(message_type), name=f"segment-{message_type}")
        for message_type in ("identify", "track", "page", "screen", "group", "alias")
    ],
]
schema.describe(urlpatterns)  # the OpenAPI description of each endpoint (segment_ingest/schema.py)
