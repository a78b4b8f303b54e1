"""Retroactive reprocessing: mapping stored unmapped events after a rule or feature appears.

A job walks the workspace's unmapped events in id order, a chunk per transaction:
1. lock the job row (two runners of one job, e.g. after a redelivery, take turns);
2. take the workspace's rules lock shared, like ingest, and read the rules at that version:
   a rule cannot change while a chunk maps with it;
3. read the next chunk of unmapped events after ``cursor`` and up to ``last_event_id``,
   locking them so a concurrent merge or a second job cannot change them half-way;
4. decide each event with the same evaluator as ingest (``features.mapping.decide``);
5. flip the mapped events' status in one UPDATE that only touches rows still unmapped, and
   record usage for exactly the rows it flipped (ON CONFLICT DO NOTHING on (event, feature));
6. advance the cursor and counters, and commit.
A worker killed mid-chunk loses only that uncommitted chunk; its successor resumes at the
cursor, and the status check plus the unique (event, feature) constraint make a repeat harmless.
"""

import logging
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from kana.locks import lock_rules_shared, lock_workspace_jobs
from kana.models import Workspace
from segment_ingest.models import Event, EventStatus, UnmappedReason
from users import services as user_services

from .mapping import decide, load_rule_set
from .models import JobStatus, ReprocessingJob, Usage

logger = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    scanned: int
    mapped: int
    finished: bool


def claim_job(job_id: int) -> bool:
    """Mark a queued (or stalled running) job as running; False when it is finished."""
    now = timezone.now()
    claimed = ReprocessingJob.objects.filter(pk=job_id, status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).update(
        status=JobStatus.RUNNING, heartbeat_at=now
    )
    ReprocessingJob.objects.filter(pk=job_id, started_at__isnull=True).update(started_at=now)
    return claimed == 1


CLAIMED, WAIT, FINISHED = "claimed", "wait", "finished"


def claim_job_or_wait(job_id: int, *, limit: int) -> str:
    """``claim_job`` unless ``limit`` other jobs of the job's workspace are running now
    (heartbeat not stale): then WAIT, and the job stays queued for a later try.

    Claims of one workspace are serialised by ``lock_workspace_jobs``, so the cap is exact.
    FINISHED when the job is done or failed (nothing to run).
    """
    now = timezone.now()
    with transaction.atomic():
        job = ReprocessingJob.objects.filter(pk=job_id).values("workspace_id", "status").first()
        if job is None or job["status"] not in (JobStatus.QUEUED, JobStatus.RUNNING):
            return FINISHED
        lock_workspace_jobs(job["workspace_id"])
        fresh = now - timezone.timedelta(seconds=settings.KANA_JOB_STALE_SECONDS)
        running = (
            ReprocessingJob.objects.for_workspace(job["workspace_id"])
            .filter(status=JobStatus.RUNNING, heartbeat_at__gte=fresh)
            .exclude(pk=job_id)
            .count()
        )
        if running >= limit:
            # Sent again by the task itself: the sweeper need not re-send it too.
            ReprocessingJob.objects.filter(pk=job_id, status=JobStatus.QUEUED).update(heartbeat_at=now)
            return WAIT
        return CLAIMED if claim_job(job_id) else FINISHED


def _candidate_events(job: ReprocessingJob):
    events = Event.objects.for_workspace(job.workspace_id).filter(
        status=EventStatus.UNMAPPED, id__gt=job.cursor, id__lte=job.last_event_id
    )
    if job.feature_id is not None:
        # A new feature only concerns events that named it as featureId.
        events = events.filter(unmapped_reason=UnmappedReason.UNKNOWN_FEATURE)
    elif job.rule is not None and job.rule.event_name is not None:
        # Narrow in SQL by the rule's event name; the evaluator decides the rest.
        events = events.filter(name=job.rule.event_name)
    return events


# One (event_id, feature_id, rule_id or None, amount) per usage record to write.
UsageRow = tuple[int, int, int | None, Decimal]


def process_chunk(job_id: int, chunk_size: int | None = None) -> ChunkResult:
    """Map one chunk of a job's events; a fixed number of queries whatever the chunk size."""
    chunk_size = chunk_size or settings.KANA_REPROCESS_CHUNK_SIZE
    with transaction.atomic():
        job = ReprocessingJob.objects.select_for_update(of=("self",)).select_related("rule").get(pk=job_id)
        if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            return ChunkResult(0, 0, True)
        rule_set = load_rule_set(job.workspace_id, lock_rules_shared(job.workspace_id))
        # Only what the evaluator needs: user and time are joined in SQL when usage is written.
        rows = list(
            _candidate_events(job)
            .order_by("id")
            .select_for_update(of=("self",))
            .values_list("id", "name", "unmapped_reason", "payload__properties", "user_id", "external_user_id")[
                :chunk_size
            ]
        )
        usages: list[UsageRow] = []
        mapped_ids: list[int] = []
        new_reasons: dict[str, list[int]] = defaultdict(list)
        orphans: dict[int, str] = {}
        for event_id, name, reason, properties, user_pk, external_id in rows:
            decision = decide(rule_set, name, properties if isinstance(properties, dict) else {})
            if decision.status == EventStatus.MAPPED:
                mapped_ids.append(event_id)
                usages.extend((event_id, feature, rule, amount) for feature, amount, rule in decision.usages)
                if user_pk is None and external_id:
                    orphans[event_id] = external_id
            elif decision.reason != reason:
                # Still unmapped, for another reason now (a new feature, but an invalid delta).
                new_reasons[decision.reason].append(event_id)
        if orphans:
            _attach_users(job.workspace, orphans)
        mapped = _map_events(job.workspace_id, mapped_ids, usages) if mapped_ids else 0
        for reason, ids in new_reasons.items():
            Event.objects.filter(id__in=ids, status=EventStatus.UNMAPPED).update(unmapped_reason=reason)
        finished = len(rows) < chunk_size
        updates = {
            "scanned": F("scanned") + len(rows),
            "mapped": F("mapped") + mapped,
            "heartbeat_at": timezone.now(),
        }
        if rows:
            updates.update(cursor=rows[-1][0], failures=0)
        if finished:
            updates.update(status=JobStatus.DONE, finished_at=timezone.now())
        ReprocessingJob.objects.filter(pk=job_id).update(**updates)
    return ChunkResult(len(rows), mapped, finished)


def _attach_users(workspace: Workspace, orphans: dict[int, str]) -> None:
    """Give events whose user was deleted (detached, ``user`` null) the user their userId
    resolves to now, created if there is none, as a new track with that userId would get.

    Without a user an event could never be mapped: it stayed unmapped for good. Only events
    this chunk maps are attached (a few queries, only when there are such events).
    """

    def resolve() -> dict[str, int]:
        with transaction.atomic():  # a savepoint: a userId created concurrently is retried
            return user_services.resolve_users(workspace=workspace, external_ids=set(orphans.values()))

    user_pks = user_services.run_with_retries(resolve)
    event_ids = list(orphans)
    owners = [user_pks[orphans[event_id]] for event_id in event_ids]
    if connection.vendor != "postgresql":
        for event_id, owner in zip(event_ids, owners, strict=True):
            Event.objects.filter(id=event_id, user__isnull=True).update(user_id=owner)
        return
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Event._meta.db_table} AS e SET user_id = v.user_id"
            " FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, user_id)"
            " WHERE e.id = v.id AND e.user_id IS NULL",
            [event_ids, owners],
        )


def _map_events(workspace_id: int, event_ids: list[int], usages: list[UsageRow]) -> int:
    """Flip still-unmapped events to mapped and record their usage; returns events flipped.

    Usage is written only for the rows this UPDATE flipped, with the event's user and
    original time, so an event can never be counted by two runs.
    """
    if connection.vendor == "postgresql":
        return _map_events_postgres(workspace_id, event_ids, usages)
    flipped = dict(
        Event.objects.filter(id__in=event_ids, status=EventStatus.UNMAPPED, user__isnull=False).values_list(
            "id", "user_id"
        )
    )
    times = dict(Event.objects.filter(id__in=list(flipped)).values_list("id", "occurred_at"))
    Event.objects.filter(id__in=list(flipped)).update(status=EventStatus.MAPPED, unmapped_reason="")
    Usage.objects.bulk_create(
        [
            Usage(
                workspace_id=workspace_id,
                user_id=flipped[event_id],
                feature_id=feature_id,
                event_id=event_id,
                rule_id=rule_id,
                amount=amount,
                occurred_at=times[event_id],
            )
            for event_id, feature_id, rule_id, amount in usages
            if event_id in flipped
        ],
        ignore_conflicts=True,
        batch_size=1000,
    )
    return len(flipped)


# One statement, one round trip: arrays in, the count of events flipped out. Set-based, so
# its cost is PostgreSQL's, not Python's (S4 in docs/performance).
_MAP_EVENTS_SQL = f"""
WITH flipped AS (
    UPDATE {Event._meta.db_table} SET status = %(mapped)s, unmapped_reason = ''
    WHERE id = ANY(%(event_ids)s) AND status = %(unmapped)s AND user_id IS NOT NULL
    RETURNING id, user_id, occurred_at
), recorded AS (
    INSERT INTO {Usage._meta.db_table} (workspace_id, user_id, feature_id, event_id, rule_id, amount, occurred_at)
    SELECT %(workspace_id)s, flipped.user_id, u.feature_id, u.event_id, u.rule_id, u.amount, flipped.occurred_at
    FROM unnest(%(u_event)s::bigint[], %(u_feature)s::bigint[], %(u_rule)s::bigint[], %(u_amount)s::numeric[])
        AS u(event_id, feature_id, rule_id, amount)
    JOIN flipped ON flipped.id = u.event_id
    ON CONFLICT (event_id, feature_id) DO NOTHING
)
SELECT count(*) FROM flipped
"""


def _map_events_postgres(workspace_id: int, event_ids: list[int], usages: list[UsageRow]) -> int:
    u_event, u_feature, u_rule, u_amount = (list(column) for column in zip(*usages, strict=True))
    with connection.cursor() as cursor:
        cursor.execute(
            _MAP_EVENTS_SQL,
            {
                "mapped": EventStatus.MAPPED.value,
                "unmapped": EventStatus.UNMAPPED.value,
                "workspace_id": workspace_id,
                "event_ids": event_ids,
                "u_event": u_event,
                "u_feature": u_feature,
                "u_rule": u_rule,
                "u_amount": u_amount,
            },
        )
        return cursor.fetchone()[0]


# Attempts at one chunk before its job is failed: enough to ride out a passing fault, few
# enough that a chunk that can never commit does not hold a worker (and the job) forever.
MAX_CHUNK_FAILURES = 3


def record_chunk_failure(job_id: int, error: str) -> bool:
    """Count a failed attempt at a job's current chunk; True when the job is now failed.

    Called after the chunk's transaction rolled back. The job fails (status ``failed``,
    ``error`` shown with the rule's progress) at the MAX_CHUNK_FAILURES-th attempt in a row.
    """
    with transaction.atomic():
        job = (
            ReprocessingJob.objects.select_for_update()
            .filter(pk=job_id, status__in=[JobStatus.QUEUED, JobStatus.RUNNING])
            .first()
        )
        if job is None:
            return True  # finished (or failed) meanwhile: nothing more to run
        job.failures += 1
        job.error = error[:2000]
        job.heartbeat_at = timezone.now()
        if job.failures >= MAX_CHUNK_FAILURES:
            job.status, job.finished_at = JobStatus.FAILED, timezone.now()
        job.save(update_fields=["failures", "error", "heartbeat_at", "status", "finished_at"])
        return job.status == JobStatus.FAILED


def fail_job(job_id: int, error: str) -> None:
    ReprocessingJob.objects.filter(pk=job_id).exclude(status=JobStatus.DONE).update(
        status=JobStatus.FAILED, error=error[:2000], finished_at=timezone.now()
    )


def stalled_job_ids() -> list[int]:
    """Jobs to send again: queued ones never picked up (the broker was down when they were
    created) and running ones whose worker stopped sending heartbeats (it died).

    A queued job's ``heartbeat_at`` is when it was last re-sent, so a job waiting behind a
    long queue is re-sent once per stale period, not at every sweep.
    """
    now = timezone.now()
    cutoff = now - timezone.timedelta(seconds=settings.KANA_JOB_STALE_SECONDS)
    queued = ReprocessingJob.objects.annotate(last_sent=Coalesce("heartbeat_at", "created_at")).filter(
        status=JobStatus.QUEUED, last_sent__lt=cutoff
    )
    stalled = ReprocessingJob.objects.filter(status=JobStatus.RUNNING, heartbeat_at__lt=cutoff)
    ids = set(queued.values_list("id", flat=True)) | set(stalled.values_list("id", flat=True))
    ReprocessingJob.objects.filter(id__in=ids, status=JobStatus.QUEUED).update(heartbeat_at=now)
    return sorted(ids)
