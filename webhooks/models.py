"""Webhook endpoints, the events they are told about, and each event's delivery to each endpoint.

One table per step of the flow, all carrying the workspace: an endpoint (what a customer
asked for), an event (one notification, stored once per ``event_key``), a delivery (that
event for one endpoint: its state and when to try next) and the delivery's attempts (what
each POST answered).
"""

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone

from kana.models import Workspace, WorkspaceQuerySet


class WebhookEventType(models.TextChoices):
    USAGE_THRESHOLD_REACHED = "usage.threshold_reached"
    USAGE_LIMIT_REACHED = "usage.limit_reached"
    SUBSCRIPTION_UPDATED = "subscription.updated"
    USER_MERGED = "user.merged"


class WebhookEndpoint(models.Model):
    """A URL of the customer's that is told about the workspace's ``events``.

    ``thresholds`` (fractions of a budget, e.g. ``[0.8, 1.0]``) narrow
    ``usage.threshold_reached``: a notification whose ``data["threshold"]`` is not one of them
    is not delivered here. ``secret`` signs every delivery; the API shows it once, when the
    endpoint is created or its secret rotated, and never again (it is kept because signing
    needs it). After a rotation, ``previous_secret`` signs too (a second ``v1=``) until
    ``previous_secret_expires_at``, so a receiver can switch secrets without refusing a delivery.
    """

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    url = models.CharField(max_length=2000)
    events = models.JSONField(default=list)
    thresholds = models.JSONField(default=list)
    secret = models.CharField(max_length=100)
    previous_secret = models.CharField(max_length=100, blank=True, default="")
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    objects = WorkspaceQuerySet.as_manager()

    def __str__(self) -> str:
        return self.url

    def signing_secrets(self, now) -> list[str]:
        """The secrets a delivery made at ``now`` is signed with: the current one first."""
        if self.previous_secret and self.previous_secret_expires_at and now < self.previous_secret_expires_at:
            return [self.secret, self.previous_secret]
        return [self.secret]


class WebhookEvent(models.Model):
    """One notification, stored once: ``event_key`` is unique per workspace, so the same
    notification sent again (a retried transaction, two paths crossing one threshold) finds
    its row and adds no delivery. Its id is the ``id`` receivers deduplicate on."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    event_type = models.CharField(max_length=64, choices=WebhookEventType.choices)
    event_key = models.CharField(max_length=255)
    data = models.JSONField(encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["workspace", "event_key"], name="webhook_event_unique_key"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_key}"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"  # not answered 2xx yet, and still within the retry window
    DELIVERED = "delivered"
    FAILED = "failed"  # no 2xx within the retry window, or the endpoint was deactivated


class WebhookDelivery(models.Model):
    """One event for one endpoint. The row is the truth and the broker only a doorbell: a
    pending delivery whose ``next_attempt_at`` has come is sent by whichever worker claims it
    first (``webhooks.delivery``), whether its task message arrived or the sweeper found it."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    event = models.ForeignKey(WebhookEvent, on_delete=models.CASCADE, related_name="deliveries")
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempt_count = models.PositiveIntegerField(default=0)
    # When the next attempt is due; while an attempt is in flight, when its claim lapses.
    # Null once the delivery is delivered or failed.
    next_attempt_at = models.DateTimeField(null=True, blank=True, default=timezone.now)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_response = models.TextField(blank=True, default="")
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["event", "endpoint"], name="webhook_delivery_unique_endpoint"),
        ]
        indexes = [
            # The sweeper's question: which pending deliveries are due?
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(status="pending"),
                name="webhook_delivery_due_idx",
            ),
            # An endpoint's deliveries, newest first (the API's list).
            models.Index(fields=["endpoint", "-created_at", "-id"], name="webhook_delivery_list_idx"),
        ]

    def __str__(self) -> str:
        return f"delivery {self.pk} ({self.status})"


class DeliveryAttempt(models.Model):
    """One POST of a delivery and what came back: a status code and the start of the body, or
    the error that stopped it (timeout, refused connection)."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField()
    attempted_at = models.DateTimeField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    response_excerpt = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")
    duration_ms = models.PositiveIntegerField()

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["delivery", "number"], name="webhook_attempt_unique_number"),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of delivery {self.delivery_id}"
