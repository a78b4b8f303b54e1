"""Kana users (the SaaS company's end users), their userIds, groups and the merge ledger."""

from django.db import models
from django.utils import timezone

from kana.jobs import Job, JobStatus
from kana.models import Workspace, WorkspaceQuerySet


class BillingProvider(models.TextChoices):
    STRIPE = "stripe", "Stripe"
    CHARGEBEE = "chargebee", "Chargebee"


class UserFlag(models.TextChoices):
    NO_BILLING_ID = "no_billing_id", "Not connected to a billing provider"
    SAME_EMAIL = "same_email", "Shares its email with another user"
    BILLING_CONFLICT = "billing_conflict", "Merged from users with different billing ids"


class EndUser(models.Model):
    """One person of a Kana customer. Called EndUser to keep it apart from dashboard logins.

    ``user_id`` is the canonical Segment userId (null for a "bare" user imported from Stripe
    or CSV); every userId that resolves to the user, canonical included, is a UserIdentity.
    Each profile field remembers when it was last set so that an older message, arriving
    late, never overwrites a newer value.
    """

    # No index of its own: the unique (workspace, user_id), the partial (workspace, email_key)
    # and the (workspace, created_at, id) indexes all lead with it, so one more was only a
    # write per user.
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+", db_index=False)
    user_id = models.CharField(max_length=255, null=True, blank=True)
    name = models.CharField(max_length=255, blank=True, default="")
    name_set_at = models.DateTimeField(null=True, blank=True)
    email = models.CharField(max_length=320, blank=True, default="")
    # Lower-cased, trimmed email: what "same email" means. Empty when there is none.
    email_key = models.CharField(max_length=320, blank=True, default="")
    email_set_at = models.DateTimeField(null=True, blank=True)
    billing_id = models.CharField(max_length=50, blank=True, default="")
    billing_provider = models.CharField(max_length=20, choices=BillingProvider.choices, blank=True, default="")
    billing_set_at = models.DateTimeField(null=True, blank=True)
    # Engage audiences and computed traits: {name: {"value": ..., "set_at": iso8601}}.
    audiences = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["workspace", "user_id"],
                condition=models.Q(user_id__isnull=False),
                name="enduser_unique_canonical_user_id",
            ),
        ]
        indexes = [
            # Leads with the email key (not the workspace) so that the engine's per-key probe
            # (``users.bulk.lock_users_sql``, workspace as ``workspace_id + 0``) can use no
            # other index, whatever the statistics say; the workspace's own "same email"
            # reads use the partial index below or this one.
            models.Index(fields=["email_key", "workspace"], name="enduser_email_ws_idx"),
            # Users that have an email: what "same email" looks through. Most users (those
            # tracks create) have none, so this stays small and its probes stay cheap
            # whatever the statistics say about the empty key.
            models.Index(
                fields=["workspace", "email_key"],
                condition=~models.Q(email_key=""),
                name="enduser_ws_email_set_idx",
            ),
            models.Index(fields=["workspace", "created_at", "id"], name="enduser_ws_created_idx"),
        ]

    def __str__(self) -> str:
        return self.user_id or self.email or f"user {self.pk}"

    @property
    def is_bare(self) -> bool:
        return not self.user_id

    def audience_values(self) -> dict:
        return {name: entry.get("value") for name, entry in sorted(self.audiences.items())}


class UserIdentity(models.Model):
    """A userId that resolves to a user: its canonical id, aliases and absorbed users' ids."""

    # Always its user's workspace (the engine writes both from one workspace), so PostgreSQL's
    # check of the user's reference implies this one: no constraint (a deferred check per
    # identity at commit) and no index of its own (the unique (workspace, external_id) leads
    # with it). Django still cascades a workspace's deletion to its identities.
    workspace = models.ForeignKey(
        Workspace, on_delete=models.CASCADE, related_name="+", db_index=False, db_constraint=False
    )
    user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="identities")
    external_id = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["workspace", "external_id"], name="identity_unique_external_id"),
        ]


class Group(models.Model):
    """A Segment group (an account or company) with its latest traits."""

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    group_id = models.CharField(max_length=255)
    traits = models.JSONField(default=dict, blank=True)
    traits_set_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["workspace", "group_id"], name="group_unique_group_id")]


class GroupMembership(models.Model):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="group_memberships")
    joined_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["group", "user"], name="membership_unique_group_user")]


class MergeReason(models.TextChoices):
    IDENTIFY = "identify", "Identify call"
    ALIAS = "alias", "Alias call"
    ADMIN = "admin", "Admin"
    CSV = "csv", "CSV import"


class MergeRecord(models.Model):
    """The merge ledger: one row per absorbed user.

    ``absorbed_id`` is unique among standing (not undone) merges, so a user can be absorbed
    only once: replaying the same merge (a retried request, a replayed message) finds the row
    and changes nothing. An undone merge (``users.unmerge``) keeps its row, with ``undone_at``.
    """

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    survivor = models.ForeignKey(EndUser, null=True, on_delete=models.SET_NULL, related_name="merges")
    survivor_key = models.BigIntegerField()  # survivor's id, kept if the survivor is later deleted
    # The survivor this merge was into. survivor_key follows later merges (a survivor absorbed
    # in turn hands its rows on); this does not. Null on rows written before it existed.
    merged_into = models.BigIntegerField(null=True, blank=True)
    absorbed_id = models.BigIntegerField()
    absorbed_snapshot = models.JSONField()
    reason = models.CharField(max_length=20, choices=MergeReason.choices)
    actor = models.CharField(max_length=255, blank=True, default="")
    source = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    # The fields this merge found different (``users.conflicts``' dicts): with the snapshot,
    # the ledger keeps both values of each.
    conflicts = models.JSONField(default=list, blank=True)
    # An automatic merge (identify, alias, CSV) dropped one of two billing ids: the survivor
    # is flagged ``billing_conflict`` while this merge stands.
    billing_conflict = models.BooleanField(default=False)
    undone_at = models.DateTimeField(null=True, blank=True)
    undone_by = models.CharField(max_length=255, blank=True, default="")

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["absorbed_id"],
                condition=models.Q(undone_at__isnull=True),
                name="merge_unique_standing_absorbed",
            ),
        ]
        indexes = [
            models.Index(fields=["workspace", "-created_at"], name="merge_ws_created_idx"),
            # What the billing_conflict flag looks up per listed user: few rows, a small index.
            models.Index(
                fields=["workspace", "survivor_key"],
                condition=models.Q(billing_conflict=True),
                name="merge_billing_conflict_idx",
            ),
        ]


class Suppression(models.Model):
    """A userId of a deleted user: later messages naming it are answered ``suppressed`` and
    not stored (Segment's suppress-and-delete). Written by ``users.services.delete_user`` in
    the deletion's transaction; read by ingest with one indexed lookup per run of messages."""

    # No index of its own: the unique (workspace, …) index leads with it (migration 0006).
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+", db_index=False)
    user_id = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["workspace", "user_id"], name="suppression_unique_user_id")]


class AnonymousLink(models.Model):
    """An anonymousId an identify or alias tied to a userId, in a workspace that holds
    anonymous events: a held event that arrives later (Segment does not keep order) goes
    straight to that userId's user. Keeps the userId, not the user, so merges and unmerges
    need not touch it: the userId resolves to whoever holds it now. The first link wins."""

    # No index of its own: the unique (workspace, …) index leads with it (migration 0006).
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+", db_index=False)
    anonymous_id = models.CharField(max_length=255)
    user_id = models.CharField(max_length=255)
    created_at = models.DateTimeField(default=timezone.now)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["workspace", "anonymous_id"], name="anonymous_link_unique_anonymous_id")
        ]


# The CSV import job shares its statuses with every job.
ImportStatus = JobStatus


class ImportJob(Job):
    """A CSV import of users: its file, progress, counts and where its per-row report is.

    ``done`` with ``applied`` false means the file was read to the end but nothing was
    changed: a dry run, or an apply that found row errors (all or nothing).
    """

    dry_run = models.BooleanField(default=False)
    applied = models.BooleanField(default=False)
    actor = models.CharField(max_length=255, blank=True, default="")
    file_name = models.CharField(max_length=255, blank=True, default="")
    # Names in the default storage: the uploaded file (kept for the worker) and the report.
    source_path = models.CharField(max_length=255, blank=True, default="")
    report_path = models.CharField(max_length=255, blank=True, default="")
    rows_total = models.PositiveIntegerField(default=0)
    rows_processed = models.PositiveIntegerField(default=0)
    created = models.PositiveIntegerField(default=0)
    updated = models.PositiveIntegerField(default=0)
    merged = models.PositiveIntegerField(default=0)
    unchanged = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    # The report's first rows (errors first), bounded so a huge file never lands in one row.
    sample = models.JSONField(default=list, blank=True)
    error_code = models.CharField(max_length=50, blank=True, default="")

    class Meta:
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="import_status_heartbeat_idx")]

    def counts(self) -> dict[str, int]:
        return {
            "created": self.created,
            "updated": self.updated,
            "merged": self.merged,
            "unchanged": self.unchanged,
            "error": self.errors,
        }
