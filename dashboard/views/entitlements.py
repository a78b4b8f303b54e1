"""A user's plan (SPEC §11): their subscriptions and their groups', subscribe, change plan or
cancel, and one period bar per feature their subscriptions name, with what a check answers."""

from decimal import Decimal

from django.contrib import messages
from django.db.models import Q
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from entitlements.access import evaluate, number, user_subject
from entitlements.models import (
    LIVE_STATUSES,
    Package,
    PackageFeature,
    PackageStatus,
    Subscription,
    SubscriptionStatus,
)
from entitlements.services import EntitlementError, subscription_create, subscription_update
from features.models import Feature
from users.models import EndUser

from ..access import actor_of, workspace_view
from ..forms import SubscribeForm, SubscriptionChangeForm
from ..templatetags.kana_dashboard import service_message


def _user_or_404(request, pk: int):
    return get_object_or_404(EndUser.objects.for_workspace(request.workspace), pk=pk)


def _subscriptions(workspace, subject) -> list[Subscription]:
    """The user's own subscriptions and their groups', newest first."""
    owners = Q(user_id=subject.user_pk) | Q(group_id__in=subject.group_pks)
    return list(
        Subscription.objects.for_workspace(workspace)
        .filter(owners)
        .select_related("package", "group")
        .order_by("-created_at", "-pk")
    )


def _published(workspace):
    return Package.objects.for_workspace(workspace).filter(status=PackageStatus.PUBLISHED).order_by("key")


def _meter(entitlement) -> dict:
    """The period bar of one decision: used (and held) against the budget."""
    consumption = entitlement.consumption
    meter = {"access": entitlement.access, "reason": entitlement.reason, "period": entitlement.period}
    if consumption is None:
        return meter
    spent = consumption.used + consumption.held
    budget = consumption.budget
    if budget is None:
        percent = 0
    elif budget <= 0:
        percent = 100 if spent > 0 else 0
    else:
        percent = int(min(spent / budget, Decimal(1)) * 100)
    return {
        **meter,
        "used": number(consumption.used),
        "held": number(consumption.held),
        "budget": number(budget),
        "remaining": number(consumption.remaining),
        "over": budget is not None and spent > budget,
        "percent": percent,
        "reset_period": entitlement.reset_period,
    }


def _entitlements(workspace, subject, subscriptions: list[Subscription]) -> list[dict]:
    """One row per feature any of the subscriptions' packages names (live or not), with the
    decision a check of one more unit gets now (``entitlements.access.evaluate``)."""
    package_ids = {s.package_id for s in subscriptions}
    feature_ids = set(
        PackageFeature.objects.for_workspace(workspace)
        .filter(package_id__in=package_ids)
        .values_list("feature_id", flat=True)
    )
    rows = []
    for feature in Feature.objects.for_workspace(workspace).filter(pk__in=feature_ids).order_by("key"):
        rows.append({"feature": feature, **_meter(evaluate(workspace, subject, feature))})
    return rows


def _page(request, user, subscribe_form=None, status_code=200):
    workspace = request.workspace
    subject = user_subject(workspace, user.pk)
    subscriptions = _subscriptions(workspace, subject)
    published = list(_published(workspace))
    for subscription in subscriptions:
        if subscription.user_id == user.pk and subscription.status != SubscriptionStatus.CANCELLED:
            same_kind = [p for p in published if p.is_addon == subscription.package.is_addon]
            if subscription.package not in same_kind:
                same_kind.insert(0, subscription.package)
            subscription.change_form = SubscriptionChangeForm(
                packages=same_kind,
                initial={"package": str(subscription.package_id), "status": subscription.status},
                prefix=f"s{subscription.pk}",
            )
    context = {
        "end_user": user,
        "subscriptions": subscriptions,
        # More than one is shown as a warning: a merge can leave a user two live base
        # packages (``entitlements.selectors.live_base_subscriptions``).
        "live_base_packages": [
            s for s in subscriptions if s.user_id == user.pk and not s.package.is_addon and s.status in LIVE_STATUSES
        ],
        "entitlements": _entitlements(workspace, subject, subscriptions),
        "subscribe_form": subscribe_form or SubscribeForm(packages=published),
        "has_published": bool(published),
    }
    return render(request, "dashboard/user_entitlements.html", context, status=status_code)


def _here(user) -> str:
    return reverse("dashboard:user_entitlements", args=[user.pk])


@require_GET
@workspace_view
def user_entitlements(request, pk: int):
    return _page(request, _user_or_404(request, pk))


@require_POST
@workspace_view
def subscribe(request, pk: int):
    workspace = request.workspace
    user = _user_or_404(request, pk)
    form = SubscribeForm(request.POST, packages=_published(workspace))
    if form.is_valid():
        package = Package.objects.for_workspace(workspace).get(pk=form.cleaned_data["package"])
        try:
            subscription = subscription_create(
                workspace=workspace,
                package=package,
                user=user,
                status=form.cleaned_data["status"],
                started_at=form.cleaned_data["started_at"],
                actor=actor_of(request),
            )
        except EntitlementError as exc:
            form.add_error("package" if exc.field in ("package", "user_id") else None, service_message(exc))
        else:
            messages.success(request, f"Subscribed to {subscription.package.key} ({subscription.status}).")
            return redirect(_here(user))
    return _page(request, user, subscribe_form=form, status_code=400)


@require_POST
@workspace_view
def subscription_change(request, pk: int, subscription_pk: int):
    """Change plan, status, or (the Cancel button: ``status=cancelled``) cancel one of the
    user's own subscriptions; a group's subscription is changed for the group, through the API."""
    workspace = request.workspace
    user = _user_or_404(request, pk)
    subscription = get_object_or_404(
        Subscription.objects.for_workspace(workspace).select_related("package"), pk=subscription_pk, user_id=user.pk
    )
    prefix = f"s{subscription.pk}"
    if request.POST.get("cancel"):  # the Cancel button ends the subscription, whatever else the row says
        status, package_pk = SubscriptionStatus.CANCELLED, None
    else:
        status, package_pk = request.POST.get(f"{prefix}-status") or None, request.POST.get(f"{prefix}-package") or None
    package = None
    if package_pk is not None:
        package = Package.objects.for_workspace(workspace).filter(pk=package_pk if package_pk.isdigit() else 0).first()
        if package is None:
            messages.error(request, "That package does not exist (any more).")
            return redirect(_here(user))
    if status is not None and status not in SubscriptionStatus.values:
        messages.error(request, f"{status!r} is not a subscription status.")
        return redirect(_here(user))
    try:
        changed = subscription_update(
            workspace=workspace, subscription=subscription, package=package, status=status, actor=actor_of(request)
        )
    except EntitlementError as exc:
        messages.error(request, service_message(exc))
    except Subscription.DoesNotExist:  # deleted meanwhile
        raise Http404("no such subscription") from None
    else:
        if changed.status == SubscriptionStatus.CANCELLED and subscription.status != SubscriptionStatus.CANCELLED:
            messages.success(request, f"Subscription to {changed.package.key} cancelled.")
        else:
            messages.success(request, f"Subscription saved: {changed.package.key}, {changed.status}.")
    return redirect(_here(user))
