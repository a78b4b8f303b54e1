"""CSV export and import pages (placeholder until the CSV services land)."""

from django.shortcuts import render
from django.views.decorators.http import require_GET

from ..access import workspace_view
from ..forms import CsvUploadForm


@require_GET
@workspace_view
def csv_page(request):
    return render(request, "dashboard/csv.html", {"form": CsvUploadForm()})


@require_GET
@workspace_view
def csv_export(request):
    return render(request, "dashboard/csv.html", {"form": CsvUploadForm()})
