"""Workspaces (one per Kana customer) and their API keys.

Every other table carries ``workspace`` and is read through ``WorkspaceQuerySet.for_workspace``
so a query cannot forget its tenant; every table can be sharded by workspace.
"""

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone


class WorkspaceQuerySet(models.QuerySet):
    def for_workspace(self, workspace):
        """Rows of one workspace: the entry point for every tenant-owned query."""
        workspace_id = workspace if isinstance(workspace, int) else workspace.pk
        return self.filter(workspace_id=workspace_id)


class AnonymousEvents(models.TextChoices):
    """What ingest does with a track/page/screen that has only an anonymousId (SPEC §12)."""

    REJECT = "reject"  # Kana's 400 anonymous_event (the default)
    HOLD = "hold"  # stored as pending until an identify or alias links the anonymousId


# How long a workspace may hold pending anonymous events, in days.
ANONYMOUS_HOLD_DAYS_MIN, ANONYMOUS_HOLD_DAYS_MAX, ANONYMOUS_HOLD_DAYS_DEFAULT = 1, 365, 30


class Workspace(models.Model):
    name = models.CharField(max_length=200)
    # Optional shared secret: when set, ingest requests must carry X-Signature, the hex
    # HMAC-SHA1 of the raw body (Segment's webhook signature).
    signing_secret = models.CharField(max_length=200, blank=True, default="")
    # Bumped whenever a feature or mapping rule changes: ingest caches the compiled rules
    # per process and reloads them when this number moves.
    rules_version = models.PositiveBigIntegerField(default=0)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="kana_workspaces", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Settings an admin changes through kana.services.workspace_settings_update (audited).
    anonymous_events = models.CharField(
        max_length=16,
        choices=AnonymousEvents.choices,
        default=AnonymousEvents.REJECT,
        db_default=AnonymousEvents.REJECT,
    )
    anonymous_hold_days = models.PositiveSmallIntegerField(
        default=ANONYMOUS_HOLD_DAYS_DEFAULT, db_default=ANONYMOUS_HOLD_DAYS_DEFAULT
    )

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(anonymous_hold_days__gte=ANONYMOUS_HOLD_DAYS_MIN)
                & models.Q(anonymous_hold_days__lte=ANONYMOUS_HOLD_DAYS_MAX),
                name="workspace_anonymous_hold_days_range",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    """An "Admin API (Backend) Key". Only a SHA-256 of the key is stored.

    A plain (unsalted, fast) hash is enough: keys are 32 random characters, so there is no
    dictionary to try, and a fast hash keeps the per-request lookup cheap.
    """

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200, blank=True, default="")
    # The first characters, enough to recognise a key in a list without revealing it.
    prefix = models.CharField(max_length=20)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = WorkspaceQuerySet.as_manager()

    def __str__(self) -> str:
        return f"{self.prefix}…"


class AuditEntry(models.Model):
    """One admin action: who did what to which object, with a before/after summary.

    Written by ``kana.audit.record`` in the same transaction as the action (Zulip's
    RealmAuditLog habit), so an action that rolls back leaves no entry.
    """

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    # "api-key:<prefix>", "user:<username>", "segment" or "cli".
    actor = models.CharField(max_length=255, blank=True, default="")
    action = models.CharField(max_length=64)  # "feature.create", "event.void", …
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=255, blank=True, default="")
    before = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)
    after = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        indexes = [
            # The log is read newest first, optionally narrowed by action or object type.
            models.Index(fields=["workspace", "-created_at", "-id"], name="audit_ws_created_idx"),
            models.Index(fields=["workspace", "action", "-created_at"], name="audit_ws_action_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.object_type}:{self.object_id} by {self.actor or '?'}"
