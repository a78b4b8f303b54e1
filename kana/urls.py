from django.contrib import admin
from django.urls import include, path, re_path

from . import health
from .http_errors import json_errors, no_such_page, no_such_path

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("django-admin/", admin.site.urls),
    # Machine-facing sections: every error is JSON, unknown paths under them included.
    *json_errors(
        [
            # CSV export/import first, so no broader api/v1/users/<id> pattern can shadow them.
            path("api/v1/users/", include("api.csv")),
            path("api/v1/", include("api.urls")),
            path("api/", include("api.schema_urls")),  # api/schema/, api/docs/
            re_path(r"^api/", no_such_path),
        ]
    ),
    *json_errors([path("", include("segment_ingest.urls")), re_path(r"^(?:v1|segment)/", no_such_path)]),
    path("", include("dashboard.urls")),
    re_path(r"^", no_such_page),  # a friendly 404 for any other path, with KANA_DEBUG=1 too
]

handler404 = "kana.http_errors.page_not_found"
handler500 = "kana.http_errors.server_error"
