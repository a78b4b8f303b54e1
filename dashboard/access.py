"""Who may see the dashboard, and which workspace a page shows.

Dashboard logins are Django users that are members of workspaces (``Workspace.members``).
Every dashboard view is wrapped in ``workspace_view``: it requires a signed-in member and
sets ``request.workspace``; views read only through that workspace, so an object of another
workspace is simply not found (404): Kana's own page, with the navigation, never Django's
debug page (which would list the URL patterns to whoever follows a stale link in DEBUG).
"""

from functools import wraps

from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.http import Http404
from django.shortcuts import redirect, render

from kana.models import Workspace

SESSION_KEY = "kana_workspace_id"


def workspaces_of(user) -> QuerySet[Workspace]:
    return Workspace.objects.filter(members=user).order_by("name", "pk")


def current_workspace(request) -> Workspace | None:
    """The workspace chosen in this session, or the only one the admin belongs to."""
    workspaces = workspaces_of(request.user)
    chosen = request.session.get(SESSION_KEY)
    if chosen is not None:
        workspace = workspaces.filter(pk=chosen).first()
        if workspace is not None:
            return workspace
        request.session.pop(SESSION_KEY, None)  # membership was withdrawn
    candidates = list(workspaces[:2])
    return candidates[0] if len(candidates) == 1 else None


def choose_workspace(request, workspace_pk) -> Workspace | None:
    """Remember the workspace for this session if the admin is a member of it."""
    try:
        workspace_pk = int(workspace_pk)
    except (TypeError, ValueError):
        return None
    workspace = workspaces_of(request.user).filter(pk=workspace_pk).first()
    if workspace is not None:
        request.session[SESSION_KEY] = workspace.pk
    return workspace


def actor_of(request) -> str:
    """Who is acting, as the audit log names a dashboard admin: ``user:<username>``."""
    return f"user:{request.user.get_username()}"


def workspace_view(view):
    """Sign-in required; ``request.workspace`` set; no workspace chosen yet -> the picker."""

    @login_required
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        workspace = current_workspace(request)
        if workspace is None:
            if workspaces_of(request.user).exists():
                return redirect("dashboard:workspaces")
            return render(request, "dashboard/no_workspace.html", status=403)
        request.workspace = workspace
        try:
            return view(request, *args, **kwargs)
        except Http404:
            return render(request, "404.html", status=404)

    return wrapped
