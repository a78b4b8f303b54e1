"""Packages, their features' limits, subscriptions, reservations and threshold crossings (SPEC §11)."""

from django.db import models
from django.utils import timezone

from features.models import Feature
from kana.models import Workspace, WorkspaceQuerySet
from users.models import EndUser, Group


class PackageStatus(models.TextChoices):
    DRAFT = "draft"  # editable freely
    PUBLISHED = "published"  # only name, metadata and status (to archived) change
    ARCHIVED = "archived"  # takes no new subscriptions


class Package(models.Model):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=100)  # the id the customer gives it ("pro-plan")
    name = models.CharField(max_length=255, blank=True, default="")
    is_addon = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=PackageStatus.choices, default=PackageStatus.DRAFT)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["workspace", "key"], name="package_unique_key")]

    def __str__(self) -> str:
        return self.key


class ResetPeriod(models.TextChoices):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"
    NEVER = "never"


class PackageFeature(models.Model):
    """A feature a package gives, with its limit per period (null: unlimited; BINARY: always null)."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    package = models.ForeignKey(Package, on_delete=models.CASCADE, related_name="features")
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="+")
    limit = models.DecimalField(max_digits=30, decimal_places=9, null=True, blank=True)
    overage_enabled = models.BooleanField(default=False)
    reset_period = models.CharField(max_length=8, choices=ResetPeriod.choices, default=ResetPeriod.MONTH)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["package", "feature"], name="packagefeature_unique")]


class SubscriptionStatus(models.TextChoices):
    """Stripe's statuses. Only active and trialing give access."""

    ACTIVE = "active"
    TRIALING = "trialing"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    CANCELLED = "cancelled"


ACCESS_STATUSES = (SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING)
# Subscriptions still running (paid or not): a subject has at most one live base package.
LIVE_STATUSES = (
    SubscriptionStatus.ACTIVE,
    SubscriptionStatus.TRIALING,
    SubscriptionStatus.PAST_DUE,
    SubscriptionStatus.UNPAID,
    SubscriptionStatus.INCOMPLETE,
)


class Subscription(models.Model):
    """A user's or a group's subscription to a package; periods are counted from ``started_at``."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(EndUser, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    group = models.ForeignKey(Group, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    package = models.ForeignKey(Package, on_delete=models.PROTECT, related_name="subscriptions")
    status = models.CharField(max_length=20, choices=SubscriptionStatus.choices, default=SubscriptionStatus.ACTIVE)
    started_at = models.DateTimeField(default=timezone.now)  # the period anchor
    cancelled_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(user__isnull=False, group__isnull=True)
                | models.Q(user__isnull=True, group__isnull=False),
                name="subscription_one_subject",
            )
        ]
        indexes = [
            models.Index(fields=["workspace", "user"], name="subscription_ws_user_idx"),
            models.Index(fields=["workspace", "group"], name="subscription_ws_group_idx"),
        ]


class SubscriptionMove(models.Model):
    """A subscription that a merge handed from the absorbed user to the survivor: what undoing
    that merge hands back. Plain user keys, not foreign keys: the absorbed user's row is
    deleted by the merge and comes back with the same key when it is undone, and a chain of
    merges (A into B, then B into C) stacks its moves, undone newest first like the merges."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="+")
    from_user_key = models.BigIntegerField()
    to_user_key = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["workspace", "to_user_key", "from_user_key"], name="subscriptionmove_pair_idx")]


class ReservationStatus(models.TextChoices):
    HELD = "held"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


class Reservation(models.Model):
    """A hold on a budget for a long action: counts against the budget while held and unexpired.

    ``subject`` names the budget it holds ("user:<id>" or "group:<id>", the subscription's
    owner); ``user`` is who acts, whose usage a commit records.
    """

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="+")
    subject = models.CharField(max_length=40)
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="+")
    amount = models.DecimalField(max_digits=30, decimal_places=9)
    committed_amount = models.DecimalField(max_digits=30, decimal_places=9, null=True, blank=True)
    status = models.CharField(max_length=16, choices=ReservationStatus.choices, default=ReservationStatus.HELD)
    idempotency_key = models.CharField(max_length=100)
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["workspace", "idempotency_key"], name="reservation_unique_key")]
        indexes = [
            models.Index(fields=["workspace", "subject", "feature", "status"], name="reservation_held_idx"),
            models.Index(fields=["status", "expires_at"], name="reservation_expiry_idx"),
        ]


class ThresholdCrossing(models.Model):
    """A budget's usage crossed ``threshold`` (a fraction of the budget) in one period: notified once."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    subject = models.CharField(max_length=40)  # "user:<id>" or "group:<id>"
    feature = models.ForeignKey(Feature, on_delete=models.CASCADE, related_name="+")
    period_start = models.DateTimeField()
    # As precise as an endpoint's thresholds (webhooks rounds them to 6 decimals).
    threshold = models.DecimalField(max_digits=8, decimal_places=6)
    used = models.DecimalField(max_digits=40, decimal_places=9)  # a period's sum, like the counters
    budget = models.DecimalField(max_digits=30, decimal_places=9)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["workspace", "subject", "feature", "period_start", "threshold"],
                name="thresholdcrossing_unique",
            )
        ]
