"""Users: search and list with flags, detail (usage charts, events, merges), delete, void an event."""

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from features.corrections import CorrectionError, event_void
from features.selectors import event_list, user_usage, user_usage_by_day
from users.models import UserFlag
from users.selectors import flags_of, merge_history, user_ids_by_user, user_ids_of, user_list, users_with_flags
from users.services import DELETE_EVENTS_CHOICES, IdentityError, delete_user, merge_undo

from ..access import actor_of, workspace_view
from ..charts import bar_chart

PAGE_SIZE = 50
RECENT_EVENTS = 25
CHART_DAYS = 30


def with_flags_and_ids(users) -> list:
    """Attach ``flags`` and ``user_ids`` to each user of a page (one query for the ids)."""
    users = list(users)
    ids = user_ids_by_user([u.pk for u in users])
    for user in users:
        user.flags = flags_of(user)
        user.user_ids = user_ids_of(user, ids.get(user.pk, []))
    return users


@require_GET
@workspace_view
def user_list_page(request):
    query = request.GET.get("q", "").strip()
    flag = request.GET.get("flag", "")
    if flag not in UserFlag.values:
        flag = ""
    page = Paginator(user_list(request.workspace, search=query or None, flag=flag or None), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    context = {
        "page": page,
        "users": with_flags_and_ids(page.object_list),
        "query": query,
        "flag": flag,
        "flag_choices": UserFlag.choices,
    }
    return render(request, "dashboard/users.html", context)


def _user_or_404(request, pk: int):
    return get_object_or_404(users_with_flags(request.workspace), pk=pk)


@require_GET
@workspace_view
def user_detail(request, pk: int):
    workspace = request.workspace
    user = with_flags_and_ids([_user_or_404(request, pk)])[0]
    by_day = user_usage_by_day(workspace, user_pk=user.pk, days=CHART_DAYS)
    usage = [
        {**row, "chart": bar_chart(by_day.get(row["feature"], []))} for row in user_usage(workspace, user_pk=user.pk)
    ]
    context = {
        "end_user": user,  # "user" is the signed-in admin in templates
        "usage": usage,
        "chart_days": CHART_DAYS,
        "events": list(event_list(workspace, user_pk=user.pk).order_by("-occurred_at", "-pk")[:RECENT_EVENTS]),
        "merges": list(merge_history(workspace, user_pk=user.pk)[:50]),
        "memberships": list(user.group_memberships.select_related("group").order_by("group__group_id")),
    }
    return render(request, "dashboard/user_detail.html", context)


@require_http_methods(["GET", "POST"])
@workspace_view
def user_delete(request, pk: int):
    user = _user_or_404(request, pk)
    if request.method == "GET":
        return render(request, "dashboard/user_delete.html", {"end_user": user, "events": "keep"})
    events = request.POST.get("events", "keep")
    if events not in DELETE_EVENTS_CHOICES:
        return render(request, "dashboard/user_delete.html", {"end_user": user, "events": "keep"}, status=400)
    try:
        delete_user(workspace=request.workspace, user_pk=user.pk, actor=actor_of(request), events=events)
    except IdentityError as exc:  # deleted meanwhile by someone else
        raise Http404(exc.message) from None
    kept = "its events and usage are kept, anonymised" if events == "keep" else "its events and usage are deleted"
    messages.success(request, f"User {user} deleted; {kept}; its userIds are suppressed.")
    return redirect("dashboard:users")


@require_POST
@workspace_view
def event_void_page(request, pk: int, event_id: int):
    """Void one of the user's events (the "Void" button of the user page's event list)."""
    user = _user_or_404(request, pk)
    try:
        event = event_void(
            workspace=request.workspace,
            event_id=event_id,
            reason=request.POST.get("reason", ""),
            actor=actor_of(request),
        )
    except CorrectionError as exc:
        if exc.status == 404:
            raise Http404(exc.message) from None
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Event {event.name or event.message_id} voided; its usage is removed.")
    return redirect(f"{reverse('dashboard:user', args=[user.pk])}#events")


@require_POST
@workspace_view
def user_merge_undo(request, pk: int, merge_pk: int):
    """The merge history's Undo button: restore the absorbed user (refused while a later merge depends on it)."""
    try:
        result = merge_undo(workspace=request.workspace, merge_id=merge_pk, actor=actor_of(request))
    except IdentityError as exc:
        if exc.code == "unknown_merge":
            raise Http404(exc.message) from None
        messages.error(request, exc.message)
        return redirect(f"{reverse('dashboard:user', args=[pk])}#merges")
    if result.already_undone:
        messages.info(request, "This merge was already undone.")
    else:
        messages.success(request, f"Merge undone: {result.restored} is back with Kana id {result.record.absorbed_id}.")
    return redirect(f"{reverse('dashboard:user', args=[pk])}#merges")
