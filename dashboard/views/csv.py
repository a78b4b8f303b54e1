"""CSV export (streamed) and import: upload -> dry-run report -> apply, with progress.

The import services (``users.csv_import``) delete their copy of a file once a job has run, so
the dashboard keeps its own copy of an uploaded file between the dry run and the apply: the
apply then reads exactly the bytes the dry run reported on. The copy's name is kept in the
admin's session only, and deleted once applied (or when the dry run shows it cannot be).
"""

import uuid

from django.contrib import messages
from django.core.files.storage import default_storage
from django.http import FileResponse, Http404, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.text import slugify
from django.views.decorators.http import require_GET, require_POST

from users.csv_export import export_row_count, export_users_csv
from users.csv_import import CsvFileError, import_report, import_users_csv, open_import_report
from users.models import ImportJob, ImportStatus

from ..access import actor_of, workspace_view
from ..forms import CsvUploadForm

RECENT_IMPORTS = 10
_PENDING = "kana_csv_pending"  # session: {dry-run job id: stored copy of its file}


def _csv_page(request, form, status_code=200):
    context = {
        "form": form,
        "user_count": export_row_count(workspace=request.workspace),
        "imports": list(
            ImportJob.objects.for_workspace(request.workspace).order_by("-created_at", "-pk")[:RECENT_IMPORTS]
        ),
    }
    return render(request, "dashboard/csv.html", context, status=status_code)


@require_GET
@workspace_view
def csv_page(request):
    return _csv_page(request, CsvUploadForm())


@require_GET
@workspace_view
def csv_export(request):
    name = f"kana-users-{slugify(request.workspace.name) or request.workspace.pk}-{timezone.now():%Y%m%d}.csv"
    pieces = (piece.encode("utf-8") for piece in export_users_csv(workspace=request.workspace))
    response = StreamingHttpResponse(pieces, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


def _pending(request) -> dict[str, str]:
    return dict(request.session.get(_PENDING, {}))


def _forget(request, job_pk: int) -> None:
    pending = _pending(request)
    path = pending.pop(str(job_pk), None)
    if path:
        default_storage.delete(path)
    request.session[_PENDING] = pending


@require_POST
@workspace_view
def csv_import(request):
    """Upload a file and dry-run it: the report says what applying would do."""
    form = CsvUploadForm(request.POST, request.FILES)
    if not form.is_valid():
        return _csv_page(request, form, status_code=400)
    upload = form.cleaned_data["file"]
    workspace = request.workspace
    for stale_job in list(_pending(request)):  # one file waits per session: the latest upload
        _forget(request, int(stale_job))
    copy = default_storage.save(f"imports/{workspace.pk}/dashboard-{uuid.uuid4().hex}.csv", upload)
    try:
        with default_storage.open(copy, "rb") as stored:
            job = import_users_csv(
                workspace=workspace,
                file=stored,
                dry_run=True,
                actor=actor_of(request),
                file_name=upload.name,
            )
    except CsvFileError as exc:
        default_storage.delete(copy)
        form.add_error("file", exc.message)
        return _csv_page(request, form, status_code=400)
    request.session[_PENDING] = {**_pending(request), str(job.pk): copy}
    if job.status == ImportStatus.FAILED or (job.status == ImportStatus.DONE and job.errors):
        _forget(request, job.pk)  # it cannot be applied as it is
    return redirect("dashboard:csv_job", pk=job.pk)


def _job_or_404(request, pk: int) -> ImportJob:
    return get_object_or_404(ImportJob.objects.for_workspace(request.workspace), pk=pk)


@require_GET
@workspace_view
def csv_job(request, pk: int):
    job = _job_or_404(request, pk)
    report = import_report(job)
    finished = job.status in (ImportStatus.DONE, ImportStatus.FAILED)
    can_apply = job.dry_run and job.status == ImportStatus.DONE and not job.errors and str(job.pk) in _pending(request)
    context = {
        "job": job,
        "report": report,
        "finished": finished,
        "can_apply": can_apply,
        "percent": int(100 * job.rows_processed / job.rows_total) if job.rows_total else (100 if finished else 0),
    }
    return render(request, "dashboard/csv_job.html", context)


@require_GET
@workspace_view
def csv_job_progress(request, pk: int):
    report = import_report(_job_or_404(request, pk))
    report.pop("rows")
    report["finished"] = report["status"] in (ImportStatus.DONE, ImportStatus.FAILED)
    return JsonResponse(report)


@require_GET
@workspace_view
def csv_job_report(request, pk: int):
    job = _job_or_404(request, pk)
    report = open_import_report(job)
    if report is None:
        raise Http404("this import has no report yet")
    return FileResponse(
        report, as_attachment=True, filename=f"kana-import-{job.pk}-report.csv", content_type="text/csv"
    )


@require_POST
@workspace_view
def csv_job_apply(request, pk: int):
    """Apply the file a clean dry run reported on (all or nothing, by the import service)."""
    dry_run = _job_or_404(request, pk)
    copy = _pending(request).get(str(dry_run.pk))
    if not (dry_run.dry_run and dry_run.status == ImportStatus.DONE and not dry_run.errors):
        messages.error(request, "Only a finished dry run without errors can be applied.")
        return redirect("dashboard:csv_job", pk=dry_run.pk)
    if not copy or not default_storage.exists(copy):
        messages.error(request, "This file was applied already or is no longer kept: upload it again.")
        return redirect("dashboard:csv_job", pk=dry_run.pk)
    try:
        with default_storage.open(copy, "rb") as stored:
            job = import_users_csv(
                workspace=request.workspace,
                file=stored,
                dry_run=False,
                actor=actor_of(request),
                file_name=dry_run.file_name,
            )
    except CsvFileError as exc:
        messages.error(request, exc.message)
        return redirect("dashboard:csv_job", pk=dry_run.pk)
    _forget(request, dry_run.pk)
    return redirect("dashboard:csv_job", pk=job.pk)
