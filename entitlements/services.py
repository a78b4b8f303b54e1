"""Packages and subscriptions: creating and changing them (SPEC §11).

Every change writes its audit row in its own transaction; a subscription change also sends
``kana.signals.notification`` ("subscription.updated") from that transaction, so a change that
rolls back notifies nobody.
"""

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from features.models import Feature, FeatureType
from kana import audit
from kana.errors import DomainError
from kana.locks import lock_keys
from kana.models import Workspace
from kana.signals import notification
from users.models import EndUser, Group

from .models import (
    LIVE_STATUSES,
    Package,
    PackageFeature,
    PackageStatus,
    ResetPeriod,
    Subscription,
    SubscriptionStatus,
)

_PACKAGE_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


class EntitlementError(DomainError):
    """A package, subscription or entitlement request the services refuse."""


@dataclass(frozen=True)
class PackageFeatureSpec:
    feature_key: str
    limit: Decimal | None = None
    overage_enabled: bool = False
    reset_period: str = ResetPeriod.MONTH


# --- Packages -----------------------------------------------------------------------------


def package_summary(package: Package) -> dict:
    return {
        "name": package.name,
        "is_addon": package.is_addon,
        "status": package.status,
        "metadata": package.metadata,
        "features": [
            {
                "feature": pf.feature.key,
                "limit": None if pf.limit is None else str(pf.limit.normalize()),
                "overage_enabled": pf.overage_enabled,
                "reset_period": pf.reset_period,
            }
            for pf in package.features.select_related("feature").order_by("feature__key")
        ],
    }


def _clean_features(workspace: Workspace, specs: list[PackageFeatureSpec]) -> list[PackageFeature]:
    keys = [spec.feature_key for spec in specs]
    if len(set(keys)) != len(keys):
        raise EntitlementError("duplicate_feature", "a package names each feature at most once", "features")
    features = {f.key: f for f in Feature.objects.for_workspace(workspace).filter(key__in=keys)}
    rows = []
    for index, spec in enumerate(specs):
        feature = features.get(spec.feature_key)
        if feature is None:
            raise EntitlementError(
                "unknown_feature", f"no feature {spec.feature_key!r}", f"features[{index}].feature", status=404
            )
        if spec.reset_period not in ResetPeriod.values:
            raise EntitlementError(
                "invalid_reset_period",
                "reset_period is day, week, month, year or never",
                f"features[{index}].reset_period",
            )
        if feature.type == FeatureType.BINARY and spec.limit is not None:
            raise EntitlementError(
                # 409: the body is well formed; the feature's type is what refuses a limit.
                "binary_feature_limit",
                "a BINARY feature carries no limit (null)",
                f"features[{index}].limit",
                status=409,
            )
        if spec.limit is not None and spec.limit < 0:
            raise EntitlementError("invalid_limit", "a limit is 0 or more, or null", f"features[{index}].limit")
        rows.append(
            PackageFeature(
                workspace=workspace,
                feature=feature,
                limit=spec.limit,
                overage_enabled=spec.overage_enabled,
                reset_period=spec.reset_period,
            )
        )
    return rows


def _replace_features(package: Package, rows: list[PackageFeature]) -> None:
    package.features.all().delete()
    for row in rows:
        row.package = package
    PackageFeature.objects.bulk_create(rows)


def package_create(
    *,
    workspace: Workspace,
    key: str,
    name: str = "",
    is_addon: bool = False,
    status: str = PackageStatus.DRAFT,
    metadata: dict | None = None,
    features: list[PackageFeatureSpec] = (),
    actor: str = "",
) -> Package:
    key = (key or "").strip()
    if not _PACKAGE_KEY.match(key):
        raise EntitlementError("invalid_package_id", "a package id is 1-100 letters, digits, _ . : -", "id")
    if status not in (PackageStatus.DRAFT, PackageStatus.PUBLISHED):
        raise EntitlementError("invalid_status", "a new package is draft or published", "status")
    rows = _clean_features(workspace, list(features))
    with transaction.atomic():
        if Package.objects.for_workspace(workspace).filter(key=key).exists():
            raise EntitlementError("package_exists", f"a package with id {key!r} already exists", "id", status=409)
        package = Package.objects.create(
            workspace=workspace, key=key, name=name or key, is_addon=is_addon, status=status, metadata=metadata or {}
        )
        _replace_features(package, rows)
        audit.record(workspace, actor, "package.create", package.key, after=package_summary(package))
    return package


# What a published package may still change.
_PUBLISHED_CHANGES = {"name", "metadata", "status"}
_NEXT_STATUSES = {
    PackageStatus.DRAFT: {PackageStatus.DRAFT, PackageStatus.PUBLISHED, PackageStatus.ARCHIVED},
    PackageStatus.PUBLISHED: {PackageStatus.PUBLISHED, PackageStatus.ARCHIVED},
    PackageStatus.ARCHIVED: {PackageStatus.ARCHIVED},
}


def package_update(*, workspace: Workspace, package: Package, changes: dict, actor: str = "") -> Package:
    """Change a package: ``changes`` holds any of name, is_addon, status, metadata, features
    (a list of PackageFeatureSpec). A draft changes freely; a published package only its name,
    metadata and status (to archived); an archived one only its name and metadata."""
    with transaction.atomic():
        package = Package.objects.for_workspace(workspace).select_for_update().get(pk=package.pk)
        before = package_summary(package)
        if package.status != PackageStatus.DRAFT:
            refused = sorted(set(changes) - _PUBLISHED_CHANGES)
            if refused:
                raise EntitlementError(
                    "package_published",
                    f"a {package.status} package may change only its name, metadata and status,"
                    f" not {', '.join(refused)}",
                    refused[0],
                    status=409,
                )
        status = changes.get("status", package.status)
        if status not in _NEXT_STATUSES[package.status]:
            raise EntitlementError(
                "invalid_status_change", f"a {package.status} package cannot become {status}", "status", status=409
            )
        for name in ("name", "is_addon", "metadata"):
            if name in changes:
                setattr(package, name, changes[name] if changes[name] is not None else getattr(package, name))
        if package.is_addon != before["is_addon"] and package.subscriptions.exists():
            raise EntitlementError("package_in_use", "a package with subscriptions keeps its kind", "is_addon", 409)
        package.status = status
        package.updated_at = timezone.now()
        package.save()
        if "features" in changes:
            _replace_features(package, _clean_features(workspace, list(changes["features"])))
        audit.record(workspace, actor, "package.update", package.key, before=before, after=package_summary(package))
    return package


def package_delete(*, workspace: Workspace, package: Package, actor: str = "") -> None:
    """Delete a draft nobody subscribed to; anything else is archived instead."""
    with transaction.atomic():
        package = Package.objects.for_workspace(workspace).select_for_update().get(pk=package.pk)
        if package.status != PackageStatus.DRAFT or package.subscriptions.exists():
            raise EntitlementError(
                "package_in_use", "only a draft package without subscriptions can be deleted; archive it", None, 409
            )
        before = package_summary(package)
        package.delete()
        audit.record(workspace, actor, "package.delete", package.key, before=before)


# --- Subscriptions ------------------------------------------------------------------------


def subject_key(*, user_pk: int | None = None, group_pk: int | None = None) -> str:
    """The name of a budget's owner, as reservations, crossings and locks use it."""
    return f"user:{user_pk}" if user_pk is not None else f"group:{group_pk}"


def _lock_subject(workspace: Workspace, subscription_subject: str) -> None:
    # Serialises subscription changes of one subject, so the one-live-base rule is exact.
    lock_keys([f"subscriptions:{workspace.pk}:{subscription_subject}"])


def subscription_summary(subscription: Subscription) -> dict:
    return {
        "subject": subject_key(user_pk=subscription.user_id, group_pk=subscription.group_id),
        "package": subscription.package.key,
        "status": subscription.status,
        "started_at": subscription.started_at.isoformat(),
        "cancelled_at": subscription.cancelled_at.isoformat() if subscription.cancelled_at else None,
    }


def _check_package_rules(subscription: Subscription) -> None:
    """One live base package per subject; an add-on needs a live base package."""
    if subscription.status not in LIVE_STATUSES:
        return
    others = Subscription.objects.for_workspace(subscription.workspace_id).filter(
        user_id=subscription.user_id, group_id=subscription.group_id, status__in=LIVE_STATUSES
    )
    if subscription.pk:
        others = others.exclude(pk=subscription.pk)
    live_bases = others.filter(package__is_addon=False)
    if not subscription.package.is_addon and live_bases.exists():
        raise EntitlementError(
            "multiple_base_packages",
            "the subject already has a live base package; change that subscription's package",
            "package",
            409,
        )
    if subscription.package.is_addon and not live_bases.exists():
        raise EntitlementError("addon_without_base", "an add-on needs a live base package first", "package", 409)


def _require_published(package: Package) -> None:
    """Only a published package takes subscriptions: a draft is not sold yet, an archived one no longer."""
    if package.status != PackageStatus.PUBLISHED:
        raise EntitlementError(
            "package_not_published",
            f"package {package.key!r} is {package.status}: it takes no subscriptions",
            "package",
            409,
        )


def _notify(subscription: Subscription, change: str, entry_id: int) -> None:
    notification.send(
        sender=Subscription,
        workspace_id=subscription.workspace_id,
        event_type="subscription.updated",
        data={"id": subscription.pk, "change": change, **subscription_summary(subscription)},
        event_key=f"subscription.updated:{subscription.pk}:{entry_id}",
    )


def subscription_create(
    *,
    workspace: Workspace,
    package: Package,
    user: EndUser | None = None,
    group: Group | None = None,
    status: str = SubscriptionStatus.ACTIVE,
    started_at: datetime | None = None,
    actor: str = "",
) -> Subscription:
    if (user is None) == (group is None):
        raise EntitlementError("invalid_subject", "a subscription belongs to a user_id or a group_id", "user_id")
    _require_published(package)
    with transaction.atomic():
        subject = subject_key(user_pk=user.pk if user else None, group_pk=group.pk if group else None)
        _lock_subject(workspace, subject)
        now = timezone.now()
        subscription = Subscription(
            workspace=workspace,
            user=user,
            group=group,
            package=package,
            status=status,
            started_at=started_at or now,
            cancelled_at=now if status == SubscriptionStatus.CANCELLED else None,
        )
        _check_package_rules(subscription)
        subscription.save()
        entry = audit.record(
            workspace, actor, "subscription.create", subscription.pk, after=subscription_summary(subscription)
        )
        _notify(subscription, "created", entry.pk)
    return subscription


def subscription_update(
    *,
    workspace: Workspace,
    subscription: Subscription,
    package: Package | None = None,
    status: str | None = None,
    actor: str = "",
) -> Subscription:
    """Change plan (another package of the same kind: the period anchor stays) or status."""
    with transaction.atomic():
        subject = subject_key(user_pk=subscription.user_id, group_pk=subscription.group_id)
        _lock_subject(workspace, subject)
        subscription = Subscription.objects.for_workspace(workspace).select_related("package").get(pk=subscription.pk)
        before = subscription_summary(subscription)
        if package is not None and package.pk != subscription.package_id:
            _require_published(package)
            if package.is_addon != subscription.package.is_addon:
                raise EntitlementError(
                    "package_kind_mismatch",
                    "a base package changes to a base package, an add-on to an add-on",
                    "package",
                    409,
                )
            subscription.package = package
        if status is not None and status != subscription.status:
            if subscription.status == SubscriptionStatus.CANCELLED:
                raise EntitlementError(
                    "subscription_cancelled", "a cancelled subscription stays cancelled", "status", 409
                )
            subscription.status = status
            if status == SubscriptionStatus.CANCELLED:
                subscription.cancelled_at = timezone.now()
        if subscription_summary(subscription) == before:
            return subscription
        _check_package_rules(subscription)
        subscription.updated_at = timezone.now()
        subscription.save()
        entry = audit.record(
            workspace,
            actor,
            "subscription.update",
            subscription.pk,
            before=before,
            after=subscription_summary(subscription),
        )
        _notify(subscription, "updated", entry.pk)
    return subscription
