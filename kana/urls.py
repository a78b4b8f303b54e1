from django.contrib import admin
from django.urls import include, path

from . import health

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("django-admin/", admin.site.urls),
    # CSV export/import first, so no broader api/v1/users/<id> pattern can shadow them.
    path("api/v1/users/", include("users.api_csv")),
    path("", include("segment_ingest.urls")),
]
