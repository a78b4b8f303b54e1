"""The Segment page (connection status, the three boxes, API keys) and the workspace picker."""

from datetime import timedelta

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from features.selectors import segment_status
from kana.models import ApiKey
from kana.services import api_key_issue, api_key_revoke

from ..access import actor_of, choose_workspace, current_workspace, workspace_view, workspaces_of
from ..forms import ApiKeyForm

# Segment sends as events happen; a quiet day is worth a note on the page, not an alarm.
RECENT_EVENT_WINDOW = timedelta(hours=24)


def _connection(status, keys) -> tuple[str, str]:
    """(state, sentence) for the status banner."""
    if not any(key.revoked_at is None for key in keys):
        return "off", "Not connected: create an API key and give it to Segment."
    if status.last_event_at is None:
        return "waiting", "Waiting for the first event from Segment."
    if timezone.now() - status.last_event_at <= RECENT_EVENT_WINDOW:
        return "ok", "Connected: events are arriving."
    return "quiet", "No events received in the last 24 hours."


def _segment_page(request, *, form=None, new_key=None, status_code=200):
    workspace = request.workspace
    status = segment_status(workspace)
    keys = list(ApiKey.objects.for_workspace(workspace).order_by("revoked_at", "-created_at", "-pk"))
    state, sentence = _connection(status, keys)
    context = {
        "status": status,
        "keys": keys,
        "connection_state": state,
        "connection_sentence": sentence,
        "key_form": form or ApiKeyForm(),
        "new_key": new_key,
        "ingest_url": request.build_absolute_uri("/v1/"),
        "webhook_url": request.build_absolute_uri("/segment/events"),
    }
    return render(request, "dashboard/segment.html", context, status=status_code)


@require_GET
@workspace_view
def segment(request):
    return _segment_page(request)


@require_POST
@workspace_view
def key_create(request):
    form = ApiKeyForm(request.POST)
    if not form.is_valid():
        return _segment_page(request, form=form, status_code=400)
    issued = api_key_issue(workspace=request.workspace, name=form.cleaned_data["name"], actor=actor_of(request))
    # Rendered in this response only (not redirected): the raw key is never stored anywhere.
    return _segment_page(request, new_key=issued)


@require_POST
@workspace_view
def key_revoke(request, pk: int):
    api_key = get_object_or_404(ApiKey.objects.for_workspace(request.workspace), pk=pk)
    api_key_revoke(api_key=api_key, actor=actor_of(request))
    messages.success(request, f"Key {api_key.prefix}… revoked.")
    return redirect("dashboard:segment")


@require_http_methods(["GET", "POST"])
@login_required
def workspaces(request):
    if request.method == "POST":
        if choose_workspace(request, request.POST.get("workspace")) is None:
            raise Http404("no such workspace")
        return redirect("dashboard:segment")
    choices = list(workspaces_of(request.user))
    if not choices:
        return render(request, "dashboard/no_workspace.html", status=403)
    return render(request, "dashboard/workspaces.html", {"choices": choices, "current": current_workspace(request)})
