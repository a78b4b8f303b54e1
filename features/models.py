"""Features, mapping rules, usage records and reprocessing jobs."""

from django.db import models
from django.utils import timezone

from kana.models import Workspace, WorkspaceQuerySet


class FeatureType(models.TextChoices):
    BINARY = "BINARY"
    CONSUMABLE = "CONSUMABLE"


class Feature(models.Model):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=100)  # the featureId events name
    name = models.CharField(max_length=255, blank=True, default="")
    type = models.CharField(max_length=16, choices=FeatureType.choices, default=FeatureType.CONSUMABLE)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["workspace", "key"], name="feature_unique_key")]

    def __str__(self) -> str:
        return self.key


class MappingRule(models.Model):
    """Maps events to a feature. Immutable once it has mapped events, but for name and active.

    ``conditions``: [{"property": "plan.tier", "operator": "equals", "value": "pro"}, ...],
    all ANDed together with the optional event-name condition.
    """

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=255)
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="rules")
    event_name = models.CharField(max_length=255, null=True, blank=True)
    conditions = models.JSONField(default=list, blank=True)
    amount_property = models.CharField(max_length=255, null=True, blank=True)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    def __str__(self) -> str:
        return self.name


class Usage(models.Model):
    """How much of a feature one event used. At most one row per (event, feature)."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey("users.EndUser", on_delete=models.CASCADE, related_name="usage")
    feature = models.ForeignKey(Feature, on_delete=models.CASCADE, related_name="usage")
    event = models.ForeignKey("segment_ingest.Event", on_delete=models.CASCADE, related_name="usage")
    rule = models.ForeignKey(MappingRule, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage")
    amount = models.DecimalField(max_digits=30, decimal_places=9)
    occurred_at = models.DateTimeField()

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["event", "feature"], name="usage_unique_event_feature")]
        indexes = [
            models.Index(fields=["workspace", "user", "feature", "occurred_at"], name="usage_ws_user_feature_idx"),
            models.Index(fields=["workspace", "feature", "occurred_at"], name="usage_ws_feature_idx"),
        ]


class JobStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ReprocessingJob(models.Model):
    """Retroactive mapping of stored unmapped events after a rule or feature is created.

    The job walks unmapped events with ids up to ``last_event_id`` (the newest event when the
    rule was committed; later events were evaluated with the rule at ingest) in id order;
    ``cursor`` is the last id handled, so a killed worker's successor resumes after it.
    """

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    rule = models.ForeignKey(MappingRule, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs")
    feature = models.ForeignKey(Feature, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs")
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED)
    last_event_id = models.BigIntegerField(default=0)
    cursor = models.BigIntegerField(default=0)
    scanned = models.BigIntegerField(default=0)
    mapped = models.BigIntegerField(default=0)
    # Failed attempts at the chunk after ``cursor`` (reset when a chunk commits): a chunk that
    # keeps failing ends the job as failed, with ``error`` saying why, instead of looping.
    failures = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="job_status_heartbeat_idx")]
