"""Kana's URLs plus views that fail, to see what a 500 looks like (tests/test_http_errors.py)."""

from django.urls import path
from rest_framework.views import APIView

from kana import urls as kana_urls
from kana.http_errors import json_errors


def boom(request):
    raise RuntimeError("a bug")


class BoomApi(APIView):
    authentication_classes = []
    permission_classes = []

    def get(self, request):
        raise RuntimeError("a bug in a DRF view")


urlpatterns = [
    *json_errors([path("api/v1/boom", boom), path("api/v1/boom-drf", BoomApi.as_view())]),
    *json_errors([path("v1/boom", boom)]),
    path("boom/", boom),
    *kana_urls.urlpatterns,
]

handler404 = kana_urls.handler404
handler500 = kana_urls.handler500
