"""Every accepted Segment message, stored as received (with the batch context applied)."""

from django.db import models

from kana.models import Workspace, WorkspaceQuerySet


class MessageType(models.TextChoices):
    IDENTIFY = "identify"
    TRACK = "track"
    PAGE = "page"
    SCREEN = "screen"
    GROUP = "group"
    ALIAS = "alias"


# Message types that carry feature usage and go through the mapping rules.
USAGE_TYPES = (MessageType.TRACK, MessageType.PAGE, MessageType.SCREEN)


class EventStatus(models.TextChoices):
    MAPPED = "mapped"
    UNMAPPED = "unmapped"
    # identify/group/alias: applied to users, nothing to map.
    PROCESSED = "processed"


class UnmappedReason(models.TextChoices):
    NO_MATCHING_RULE = "no_matching_rule"
    UNKNOWN_FEATURE = "unknown_feature"
    INVALID_DELTA = "invalid_delta"  # the amount is not a number
    INVALID_AMOUNT = "invalid_amount"  # a number the usage column cannot hold (|x| >= 10^21)
    INVALID_VALUE = "invalid_value"  # a value the rules could not evaluate


class Event(models.Model):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    message_id = models.CharField(max_length=100)
    type = models.CharField(max_length=16, choices=MessageType.choices)
    # Track event name, or "Viewed <name> Page/Screen"; empty for other types.
    name = models.CharField(max_length=255, blank=True, default="")
    user = models.ForeignKey("users.EndUser", null=True, blank=True, on_delete=models.SET_NULL, related_name="events")
    # The userId as sent (the user may since have been merged into another).
    external_user_id = models.CharField(max_length=255, blank=True, default="")
    payload = models.JSONField()
    occurred_at = models.DateTimeField()
    received_at = models.DateTimeField()
    status = models.CharField(max_length=16, choices=EventStatus.choices)
    unmapped_reason = models.CharField(max_length=32, choices=UnmappedReason.choices, blank=True, default="")
    warnings = models.JSONField(default=list, blank=True)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["workspace", "message_id"], name="event_unique_message_id"),
        ]
        indexes = [
            # Reprocessing walks a workspace's unmapped events in id order.
            models.Index(fields=["workspace", "status", "id"], name="event_ws_status_idx"),
            models.Index(fields=["workspace", "user", "-occurred_at"], name="event_ws_user_idx"),
            models.Index(fields=["workspace", "-received_at"], name="event_ws_received_idx"),
        ]

    @property
    def properties(self) -> dict:
        properties = self.payload.get("properties")
        return properties if isinstance(properties, dict) else {}
