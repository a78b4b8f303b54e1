"""Features, mapping rules, the event store and the usage ledger, reprocessing jobs.

``features.ledger`` is the only writer of ``Event`` and ``Usage``.
"""

from django.db import models
from django.utils import timezone

from kana.jobs import Job
from kana.models import Workspace, WorkspaceQuerySet
from users.models import EndUser


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
    # Corrected by an admin (features.corrections.event_void): no usage, never mapped again.
    VOIDED = "voided"
    # A held anonymous event (workspace setting anonymous_events = hold): no user yet, kept
    # under its anonymousId (external_user_id) until an identify or alias links that id.
    PENDING = "pending"
    # A pending event whose hold window passed with no link: counted, never mapped.
    EXPIRED = "expired"


class UnmappedReason(models.TextChoices):
    NO_MATCHING_RULE = "no_matching_rule"
    UNKNOWN_FEATURE = "unknown_feature"
    INVALID_DELTA = "invalid_delta"  # the amount is not a number
    INVALID_AMOUNT = "invalid_amount"  # a number the usage column cannot hold (|x| >= 10^21)
    INVALID_VALUE = "invalid_value"  # a value the rules could not evaluate
    FEATURE_ARCHIVED = "feature_archived"


class Event(models.Model):
    # No index of its own: the unique (workspace, message_id) index leads with it. Every
    # index is written by each stored event, and ingest is the hot path.
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+", db_index=False)
    message_id = models.CharField(max_length=100)
    type = models.CharField(max_length=16, choices=MessageType.choices)
    # Track event name, or "Viewed <name> Page/Screen"; empty for other types.
    name = models.CharField(max_length=255, blank=True, default="")
    user = models.ForeignKey(EndUser, null=True, blank=True, on_delete=models.SET_NULL, related_name="events")
    # The userId as sent (the user may since have been merged into another).
    external_user_id = models.CharField(max_length=255, blank=True, default="")
    payload = models.JSONField()
    occurred_at = models.DateTimeField()
    received_at = models.DateTimeField()
    status = models.CharField(max_length=16, choices=EventStatus.choices)
    unmapped_reason = models.CharField(max_length=32, choices=UnmappedReason.choices, blank=True, default="")
    warnings = models.JSONField(default=list, blank=True)
    voided_at = models.DateTimeField(null=True, blank=True)
    # db_default: the ledger's set-based inserts name only the columns ingest fills.
    void_reason = models.CharField(max_length=500, blank=True, default="", db_default="")

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["workspace", "message_id"], name="event_unique_message_id"),
            # A voided event keeps its void time, and only a voided event has one: a path that
            # set a voided event's status back (to unmapped, say) fails here instead of
            # silently making it a reprocessing candidate again.
            models.CheckConstraint(
                condition=(
                    models.Q(status="voided", voided_at__isnull=False)
                    | (~models.Q(status="voided") & models.Q(voided_at__isnull=True))
                ),
                name="event_voided_iff_voided_at",
            ),
        ]
        indexes = [
            # Reprocessing walks a workspace's unmapped events in id order.
            models.Index(fields=["workspace", "status", "id"], name="event_ws_status_idx"),
            models.Index(fields=["workspace", "user", "-occurred_at"], name="event_ws_user_idx"),
            models.Index(fields=["workspace", "-received_at"], name="event_ws_received_idx"),
            # Unmapped events of one event name in id order: what a rule preview with an event
            # name scans, and what that rule's reprocessing job walks. Partial: mapped events,
            # most of the table, are not in it.
            models.Index(
                fields=["workspace", "name", "id"],
                condition=models.Q(status="unmapped"),
                name="event_unmapped_name_idx",
            ),
            # Held anonymous events by anonymousId: what an identify or alias looks up. Few
            # rows (only pending ones), so the probe every identify makes stays cheap.
            models.Index(
                fields=["workspace", "external_user_id"],
                condition=models.Q(status="pending"),
                name="event_pending_anonymous_idx",
            ),
        ]

    @property
    def properties(self) -> dict:
        properties = self.payload.get("properties")
        return properties if isinstance(properties, dict) else {}


class FeatureType(models.TextChoices):
    BINARY = "BINARY"
    CONSUMABLE = "CONSUMABLE"


class Feature(models.Model):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=100)  # the featureId events name
    name = models.CharField(max_length=255, blank=True, default="")
    type = models.CharField(max_length=16, choices=FeatureType.choices, default=FeatureType.CONSUMABLE)
    created_at = models.DateTimeField(default=timezone.now)
    # An archived feature records no new usage; its history stays. (A feature with usage
    # cannot be deleted: that would delete the usage.)
    archived_at = models.DateTimeField(null=True, blank=True)
    # How the product names one unit ("message", "messages"), and free customer data.
    unit_label = models.CharField(max_length=100, blank=True, default="", db_default="")
    unit_label_plural = models.CharField(max_length=100, blank=True, default="", db_default="")
    metadata = models.JSONField(default=dict, blank=True)

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

    # workspace and event have no index of their own: the composite indexes below lead with
    # them, and each usage row (ingest, reprocessing) writes every index of the table.
    #
    # Four references have no database constraint (db_constraint=False, migrations
    # features/0007 and 0008): each would cost a deferred check per usage row at COMMIT, and
    # each is already guaranteed (docs/architecture.md, "Who writes which table"). Django's
    # on_delete still applies to them. ``user`` keeps its constraint: it carries guarantees.
    #
    # workspace: always its event's (``features.ledger`` writes both from one workspace and
    # moves neither across workspaces), and the event's own reference is checked.
    workspace = models.ForeignKey(
        Workspace, on_delete=models.CASCADE, related_name="+", db_index=False, db_constraint=False
    )
    # Null: the user was deleted with its events kept (``ledger.forget_user``): the usage still
    # counts for its feature, for no user. Constrained: a merge deletes the absorbed user with
    # a plain DELETE and relies on this check to fail if any usage was left behind, and it is
    # what keeps a user's deletion from leaving usage on the events it deletes (see ``event``).
    user = models.ForeignKey(EndUser, null=True, blank=True, on_delete=models.CASCADE, related_name="usage")
    # PROTECT: recorded usage is never deleted as a side effect of deleting its feature.
    # No constraint: usage is written only under the workspace's shared rules lock, with a
    # feature read under it (the rules version), and ``feature_delete`` takes that lock
    # exclusively and refuses a feature with usage; a workspace's deletion takes it too
    # (``ledger.guard_workspace_deletion``) and is refused if the workspace has usage.
    feature = models.ForeignKey(Feature, on_delete=models.PROTECT, related_name="usage", db_constraint=False)
    # No constraint (the costliest check: on a reprocessed event it also writes a row lock
    # into the event the chunk just flipped). Usage is written either with its event, in one
    # statement (ingest, consume), or onto a stored event that the writer row-locks, under the
    # shared rules lock (reprocessing, held anonymous events). Events are deleted only by
    # ``ledger.forget_user``, under its user's row lock, with the user's usage (a writer's
    # check of ``user`` waits for that lock, then fails), and by a workspace's deletion, which
    # takes the rules lock exclusively and is refused if the workspace has usage
    # (``ledger.guard_workspace_deletion``). CASCADE is Django's.
    event = models.ForeignKey(
        Event, on_delete=models.CASCADE, related_name="usage", db_index=False, db_constraint=False
    )
    # No constraint, as for the feature: ``rule_delete`` takes the rules lock exclusively and
    # refuses a rule with usage; SET_NULL is Django's, on an ORM deletion. Its index is partial
    # (``usage_rule_idx``): every read of it looks a rule up, and usage mapped by featureId
    # (most single tracks, every consume) has no rule, so it writes no index entry.
    rule = models.ForeignKey(
        MappingRule,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="usage",
        db_index=False,
        db_constraint=False,
    )
    amount = models.DecimalField(max_digits=30, decimal_places=9)
    occurred_at = models.DateTimeField()

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["event", "feature"], name="usage_unique_event_feature")]
        indexes = [
            models.Index(fields=["workspace", "user", "feature", "occurred_at"], name="usage_ws_user_feature_idx"),
            models.Index(fields=["workspace", "feature", "occurred_at"], name="usage_ws_feature_idx"),
            models.Index(fields=["rule"], name="usage_rule_idx", condition=models.Q(rule__isnull=False)),
        ]


class UsageCounter(models.Model):
    """Usage per (user, feature, UTC day): the period totals entitlements read.

    Derived from ``Usage`` and written by nobody in Python: database triggers on the usage
    table (migration ``0005_feature_units_and_usage_counters``) add every inserted, updated
    or deleted usage row's amount to its day, so the counters follow every path that
    changes usage, including paths added later. ``manage.py rebuild_usage_counters``
    recomputes them from the usage rows. Plain id columns, no foreign keys: rows of a
    deleted user drop to zero (and are removed) as its usage goes.
    """

    workspace_id = models.BigIntegerField()
    user_id = models.BigIntegerField()
    feature_id = models.BigIntegerField()
    day = models.DateField()
    # Wider than a usage amount (30 digits): a day sums many of them, each up to 10^21.
    amount = models.DecimalField(max_digits=40, decimal_places=9)

    objects = WorkspaceQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["workspace_id", "user_id", "feature_id", "day"], name="usagecounter_unique_key"
            )
        ]


class UsageTouch(models.Model):
    """(user, feature, UTC day) keys whose usage grew since entitlements last looked: written
    by the same triggers as ``UsageCounter`` (one row per key, however many changes), drained
    by ``features.counters.drain_touched_usage`` for the threshold notifications. The day
    lets a late or reprocessed event be judged in its own period."""

    workspace_id = models.BigIntegerField()
    user_id = models.BigIntegerField()
    feature_id = models.BigIntegerField()
    day = models.DateField()
    # 1 when the pair is first touched. A later statement that touches it row-locks the row
    # (PostgreSQL: ``DO UPDATE ... WHERE false``, migration 0009; no new row version) until
    # its transaction commits, so the drain (SKIP LOCKED) never takes a pair whose newest
    # usage it could not see yet.
    touches = models.BigIntegerField(default=1, db_default=1)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["workspace_id", "user_id", "feature_id", "day"], name="usagetouch_unique_key"
            )
        ]


class ReprocessingJob(Job):
    """Retroactive mapping of stored unmapped events after a rule or feature is created.

    The job walks unmapped events with ids up to ``last_event_id`` (the newest event when the
    rule was committed; later events were evaluated with the rule at ingest) in id order;
    ``cursor`` is the last id handled, so a killed worker's successor resumes after it.

    A large job is created as parts (``reprocessing.job_parts``): one row per part, with its
    own claim, cursor, failures and progress, so two workers can run one rule's reprocessing
    at once. The parts share the job's range: each walks a *slice* of it, ``(cursor,
    slice_end]``, and claims the next slice (the next chunk of the job's candidates) when its
    own is walked, so the parts end together however the candidates lie in the range. Every
    part but the first points to the first (``part_of``); the rule's progress sums its parts,
    and the workspace's job limit counts them as one job.
    """

    rule = models.ForeignKey(MappingRule, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs")
    feature = models.ForeignKey(Feature, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs")
    last_event_id = models.BigIntegerField(default=0)
    cursor = models.BigIntegerField(default=0)
    scanned = models.BigIntegerField(default=0)
    mapped = models.BigIntegerField(default=0)
    # Failed attempts at the chunk after ``cursor`` (reset when a chunk commits): a chunk that
    # keeps failing ends the job as failed, with ``error`` saying why, instead of looping.
    failures = models.PositiveIntegerField(default=0)
    # The first part of the job this row is a part of; null for a first part (or a job in one part).
    part_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    # A part's slice of the job's range: it walks ``cursor < id <= slice_end``. Null for a job
    # in one part, which walks up to ``last_event_id``.
    slice_end = models.BigIntegerField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="job_status_heartbeat_idx")]
