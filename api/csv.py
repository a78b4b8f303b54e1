"""REST endpoints for CSV export and import of users (mounted at /api/v1/users/).

    GET  export                 the workspace's users as a streamed CSV file
    POST import?dry_run=1       multipart field ``file``; 200 with the import report when it
                                ran in the request, 202 with ``url`` to poll when queued
    GET  imports/<id>           the import report (status, counts, rows)
    GET  imports/<id>/report    the full per-row report as CSV

Views only translate HTTP to the services in ``users.csv_export`` / ``users.csv_import``.
"""

import json

from django.core.files.base import ContentFile
from django.http import FileResponse, Http404, StreamingHttpResponse
from django.urls import path, reverse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from kana.services import key_prefix
from users.csv_export import export_users_csv
from users.csv_import import CsvFileError, import_report, import_users_csv, open_import_report
from users.models import ImportJob, ImportStatus

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class CsvRenderer(BaseRenderer):
    """Lets ``Accept: text/csv`` through content negotiation; errors still render as JSON."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data if isinstance(data, bytes | str) else json.dumps(data).encode()


class JsonErrorsMixin:
    """Errors are JSON whatever the request asked for: content negotiation picked the CSV
    renderer for ``Accept: text/csv`` or ``?format=csv``, and a 401 went out as JSON text
    labelled ``text/csv``."""

    def finalize_response(self, request, response, *args, **kwargs):
        if isinstance(response, Response) and response.status_code >= 400:
            request.accepted_renderer, request.accepted_media_type = JSONRenderer(), JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)


class CsvFileRejected(exceptions.APIException):
    status_code = 400

    def __init__(self, code: str, message: str, field: str = "file"):
        super().__init__(message)
        self.kana_code, self.kana_field = code, field


def _import_body(request, job: ImportJob) -> dict:
    body = import_report(job)
    body["url"] = request.build_absolute_uri(reverse("api-users-import-detail", args=[job.pk]))
    if job.report_path:
        body["report_url"] = request.build_absolute_uri(reverse("api-users-import-report", args=[job.pk]))
    return body


def _job_or_404(request, pk: int) -> ImportJob:
    job = ImportJob.objects.for_workspace(request.workspace).filter(pk=pk).first()
    if job is None:
        raise Http404("no import with this id")
    return job


class UserExportView(JsonErrorsMixin, APIView):
    renderer_classes = [JSONRenderer, CsvRenderer]

    @extend_schema(
        operation_id="users_export",
        summary="Export every user as CSV",
        description="Header `kana_id,user_id,name,email,billing_id,billing_provider,created_at,flags`; "
        "flags joined with `;`; cells starting with = + - @ tab CR are prefixed with `'`.",
        responses={(200, "text/csv"): OpenApiResponse(response=OpenApiTypes.STR, description="the CSV file")},
    )
    def get(self, request):
        # DRF reads "?format=" as no format; the schema says one of its values.
        if request.query_params.get("format") == "":
            raise exceptions.ValidationError({"format": "format must be csv or json"})
        pieces = (piece.encode() for piece in export_users_csv(workspace=request.workspace))
        response = StreamingHttpResponse(pieces, content_type="text/csv; charset=utf-8")
        stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
        response["Content-Disposition"] = f'attachment; filename="kana-users-{stamp}.csv"'
        return response


# The file part: CSV UTF-8 (OpenAPI 3.1 names a part's media type with contentMediaType).
# The pattern states a simple form the import always takes (a header naming known columns,
# unquoted cells without NUL); users/csv_import.py reads any RFC 4180 CSV with such a header.
_CELL = r"[^\",\r\n\u0000]*"
CSV_FILE_SCHEMA = {
    "type": "string",
    "contentMediaType": "text/csv",
    "description": "CSV UTF-8 with a header row: kana_id, user_id, name, email, billing_id (any of them, one of "
    "kana_id, user_id, email at least). Sent as a file, or as the part's text.",
    "pattern": f"^(user_id|email|user_id,name,email|user_id,email,billing_id)(\r?\n{_CELL}(,{_CELL})*)*(\r?\n)?$",
}


class UserImportView(APIView):
    parser_classes = [MultiPartParser, FormParser]
    request_body_required = True  # the file part is the request: the schema says so (api/schema.py)

    @extend_schema(
        operation_id="users_import",
        summary="Import users from a CSV file",
        parameters=[OpenApiParameter("dry_run", OpenApiTypes.BOOL, description="report only, change nothing")],
        request={
            "multipart/form-data": {
                "type": "object",
                "properties": {"file": CSV_FILE_SCHEMA},
                "required": ["file"],
            }
        },
        responses={200: OpenApiTypes.OBJECT, 202: OpenApiTypes.OBJECT},
    )
    def post(self, request):
        upload = request.FILES.get("file")
        if upload is None and isinstance(request.data.get("file"), str):
            # The CSV sent as the part's text rather than as a file (`curl -F "file=<users.csv"`).
            upload = ContentFile(request.data["file"].encode(), name="upload.csv")
        if upload is None:
            raise CsvFileRejected("missing_file", "send the CSV file as the multipart field 'file'")
        raw = request.query_params.get("dry_run", "false").strip().lower()
        if raw not in _TRUE | _FALSE:  # "dry_run=" too: the schema says boolean
            raise CsvFileRejected("invalid_dry_run", "dry_run must be true or false", "dry_run")
        try:
            job = import_users_csv(
                workspace=request.workspace,
                file=upload,
                dry_run=raw in _TRUE,
                actor=f"api-key:{key_prefix(request.auth)}",
                file_name=upload.name,
            )
        except CsvFileError as exc:
            raise CsvFileRejected(exc.code, exc.message) from None
        queued = job.status in (ImportStatus.QUEUED, ImportStatus.RUNNING)
        return Response(_import_body(request, job), status=status.HTTP_202_ACCEPTED if queued else status.HTTP_200_OK)


class UserImportDetailView(APIView):
    @extend_schema(operation_id="users_import_retrieve", responses={200: OpenApiTypes.OBJECT})
    def get(self, request, pk: int):
        return Response(_import_body(request, _job_or_404(request, pk)))


class UserImportReportView(JsonErrorsMixin, APIView):
    renderer_classes = [JSONRenderer, CsvRenderer]

    @extend_schema(
        operation_id="users_import_report",
        summary="The full per-row report of an import (CSV row,result,error,code,kana_id,note)",
        responses={(200, "text/csv"): OpenApiResponse(response=OpenApiTypes.STR)},
    )
    def get(self, request, pk: int):
        report = open_import_report(_job_or_404(request, pk))
        if report is None:
            raise Http404("this import has no report yet")
        return FileResponse(
            report, as_attachment=True, filename=f"kana-import-{pk}-report.csv", content_type="text/csv; charset=utf-8"
        )


urlpatterns = [
    path("export", UserExportView.as_view(), name="api-users-export"),
    path("import", UserImportView.as_view(), name="api-users-import"),
    path("imports/<int:pk>", UserImportDetailView.as_view(), name="api-users-import-detail"),
    path("imports/<int:pk>/report", UserImportReportView.as_view(), name="api-users-import-report"),
]
