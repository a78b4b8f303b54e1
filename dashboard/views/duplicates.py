"""Duplicate review: users sharing an email, a merge preview, and the merge itself."""

from django.contrib import messages
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from entitlements.selectors import live_base_subscriptions
from users.conflicts import merge_conflicts
from users.models import MergeReason
from users.profile import CHOOSABLE_FIELDS, FIELD_CHOICES, merge_preview
from users.selectors import duplicate_groups, user_ids_by_user, users_with_flags
from users.services import IdentityError, merge_users

from ..access import actor_of, workspace_view
from .users import with_flags_and_ids


@require_GET
@workspace_view
def duplicates(request):
    groups = duplicate_groups(request.workspace)
    for group in groups:
        group.users = with_flags_and_ids(group.users)
    return render(request, "dashboard/duplicates.html", {"groups": groups})


def _int_list(values: list[str]) -> list[int]:
    try:
        return list(dict.fromkeys(int(v) for v in values))
    except ValueError:
        raise Http404("user ids are numbers") from None


def _selected_users(request, values: list[str]) -> list:
    """The selected users of this workspace; any id not in it -> 404."""
    pks = _int_list(values)
    users = list(users_with_flags(request.workspace).filter(pk__in=pks))
    if len(users) != len(pks):
        raise Http404("no such user in this workspace")
    return users


_CHOICE_LABELS = {"newest": "newest wins", "survivor": "the survivor's", "absorbed": "the absorbed user's"}


def _field_choices(params) -> dict[str, str]:
    """``keep_<field>=survivor|absorbed|newest`` from the preview's form; others are ignored."""
    return {
        field: params[f"keep_{field}"] for field in CHOOSABLE_FIELDS if params.get(f"keep_{field}") in FIELD_CHOICES
    }


def _base_packages_after(workspace, users) -> list:
    """The live base subscriptions the survivor would hold, when more than one: a merge moves
    every subscription as it is, and Kana does not choose between two plans."""
    held = live_base_subscriptions(workspace, [u.pk for u in users])
    subscriptions = [s for u in users for s in held.get(u.pk, [])]
    return subscriptions if len(subscriptions) > 1 else []


@require_GET
@workspace_view
def merge_preview_page(request):
    users = _selected_users(request, request.GET.getlist("users"))
    if len(users) < 2:
        messages.error(request, "Select at least two users to merge.")
        return redirect("dashboard:duplicates")
    survivor_pk = _int_list([request.GET["survivor"]])[0] if request.GET.get("survivor") else None
    if survivor_pk is not None and survivor_pk not in {u.pk for u in users}:
        raise Http404("the survivor must be one of the selected users")
    choices = _field_choices(request.GET)
    preview = merge_preview(users, survivor_pk=survivor_pk, choices=choices)
    conflicts = merge_conflicts(preview.survivor, preview.absorbed, preview.result)
    ordered = with_flags_and_ids([preview.survivor, *preview.absorbed])
    ids = user_ids_by_user([u.pk for u in ordered])
    result_ids = [uid for user in ordered for uid in ids.get(user.pk, [])]
    if preview.result.user_id in result_ids:
        result_ids = [preview.result.user_id, *[i for i in result_ids if i != preview.result.user_id]]
    context = {
        "users": ordered,
        "survivor": ordered[0],
        "default_survivor_pk": merge_preview(users).survivor.pk,
        "result": preview.result,
        "result_user_ids": result_ids,
        "conflicts": conflicts,
        "conflict_fields": {c.field for c in conflicts},
        "base_packages": _base_packages_after(request.workspace, ordered),
        "selected_pks": [u.pk for u in ordered],
        # Per conflicting field, whose value the merge keeps (SPEC §12): newest unless chosen.
        "choices": {field: choices.get(field, "newest") for field in CHOOSABLE_FIELDS},
        "choice_labels": _CHOICE_LABELS,
        "chosen": any(choice != "newest" for choice in choices.values()),
    }
    return render(request, "dashboard/merge_preview.html", context)


@require_POST
@workspace_view
def merge(request):
    # Ids go straight to the service: it follows ids already absorbed (a double submit merges
    # once) and refuses ids that are not users of this workspace.
    pks = _int_list(request.POST.getlist("users"))
    survivor_pk = _int_list([request.POST["survivor"]])[0] if request.POST.get("survivor") else None
    try:
        result = merge_users(
            workspace=request.workspace,
            user_pks=pks,
            survivor_pk=survivor_pk,
            reason=MergeReason.ADMIN,
            actor=actor_of(request),
            source="dashboard",
            fields=_field_choices(request.POST),
        )
    except IdentityError as exc:
        if exc.code == "unknown_user":
            raise Http404(exc.message) from None
        messages.error(request, exc.message)
        return redirect("dashboard:duplicates")
    if result.already_merged:
        messages.info(request, "These users were already merged.")
    else:
        absorbed = len(result.absorbed_ids)
        messages.success(request, f"Merged {absorbed} {'user' if absorbed == 1 else 'users'} into {result.survivor}.")
        held = live_base_subscriptions(request.workspace, [result.survivor.pk]).get(result.survivor.pk, [])
        if len(held) > 1:
            keys = ", ".join(sub.package.key for sub in held)
            messages.warning(
                request,
                f"{result.survivor} now holds {len(held)} live base packages ({keys}): cancel one on its plan page.",
            )
    return redirect("dashboard:user", pk=result.survivor.pk)
