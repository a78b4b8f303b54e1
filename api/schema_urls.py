"""The OpenAPI schema and its docs page, mounted at ``/api/`` by ``kana/urls.py``.

The schema is drawn by ``schema.KanaSchemaGenerator``: the REST API plus Segment's endpoints.
"""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from .schema import KanaSchemaGenerator

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(generator_class=KanaSchemaGenerator), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
