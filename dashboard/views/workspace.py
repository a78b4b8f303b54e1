"""The workspace's settings: its name and what ingest does with anonymous events."""

from django.contrib import messages
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from features.selectors import anonymous_event_counts
from kana.services import WorkspaceError, workspace_settings, workspace_settings_update

from ..access import actor_of, workspace_view
from ..forms import WorkspaceSettingsForm


def _settings_page(request, form, status_code=200):
    context = {"form": form, "anonymous": anonymous_event_counts(request.workspace)}
    return render(request, "dashboard/settings.html", context, status=status_code)


@require_http_methods(["GET", "POST"])
@workspace_view
def workspace_settings_page(request):
    if request.method == "GET":
        return _settings_page(request, WorkspaceSettingsForm(initial=workspace_settings(request.workspace)))
    form = WorkspaceSettingsForm(request.POST)
    if form.is_valid():
        try:
            workspace_settings_update(workspace=request.workspace, changes=form.cleaned_data, actor=actor_of(request))
        except WorkspaceError as exc:
            form.add_error(exc.field if exc.field in form.fields else None, exc.message)
        else:
            messages.success(request, "Settings saved.")
            return redirect("dashboard:settings")
    return _settings_page(request, form, status_code=400)
