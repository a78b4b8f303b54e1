"""The audit log: every admin action of the workspace, newest first."""

from django.core.paginator import Paginator
from django.shortcuts import render
from django.views.decorators.http import require_GET

from kana.audit import ACTIONS, audit_entries

from ..access import workspace_view

PAGE_SIZE = 50


@require_GET
@workspace_view
def audit_log(request):
    action = request.GET.get("action", "")
    if action not in ACTIONS:
        action = ""
    entries = audit_entries(request.workspace, action=action or None)
    page = Paginator(entries, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "dashboard/audit.html", {"page": page, "action": action, "actions": ACTIONS})
