"""Retroactive reprocessing: mapping stored unmapped events after a rule or feature appears.

A job walks the workspace's unmapped events in id order, a chunk per transaction:
1. lock the job row (two runners of one job, e.g. after a redelivery, take turns);
2. read the next chunk of unmapped events after ``cursor`` and up to ``last_event_id``,
   locking them so a concurrent merge cannot move them half-way;
3. decide each event with the same evaluator as ingest;
4. bulk-insert usage (ON CONFLICT DO NOTHING on (event, feature)) and flip the mapped events'
   status in one UPDATE that only touches rows still unmapped;
5. advance the cursor and counters, and commit.
A worker killed mid-chunk loses only that uncommitted chunk; its successor resumes at the
cursor, and the unique (event, feature) constraint makes a repeat harmless.
"""

import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from kana.models import Workspace
from segment_ingest.models import Event, EventStatus, UnmappedReason

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


def _candidate_events(job: ReprocessingJob):
    events = Event.objects.for_workspace(job.workspace_id).filter(
        status=EventStatus.UNMAPPED, id__gt=job.cursor, id__lte=job.last_event_id
    )
    if job.feature_id is not None:
        # A new feature only concerns events that named it as featureId.
        events = events.filter(unmapped_reason__in=[UnmappedReason.UNKNOWN_FEATURE])
    elif job.rule is not None and job.rule.event_name is not None:
        # Narrow in SQL by the rule's event name; the evaluator decides the rest.
        events = events.filter(name=job.rule.event_name)
    return events


def process_chunk(job_id: int, chunk_size: int | None = None) -> ChunkResult:
    chunk_size = chunk_size or settings.KANA_REPROCESS_CHUNK_SIZE
    with transaction.atomic():
        job = ReprocessingJob.objects.select_for_update(of=("self",)).select_related("rule").get(pk=job_id)
        if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            return ChunkResult(0, 0, True)
        rows = list(
            _candidate_events(job)
            .order_by("id")
            .select_for_update(of=("self",))
            .values_list("id", "name", "user_id", "occurred_at", "payload__properties")[:chunk_size]
        )
        version = Workspace.objects.filter(pk=job.workspace_id).values_list("rules_version", flat=True).get()
        rule_set = load_rule_set(job.workspace_id, version)
        usages, mapped_ids = [], []
        for event_id, name, user_id, occurred_at, properties in rows:
            decision = decide(rule_set, name, properties if isinstance(properties, dict) else {})
            if decision.status != EventStatus.MAPPED or user_id is None:
                continue
            mapped_ids.append(event_id)
            usages.extend(
                Usage(
                    workspace_id=job.workspace_id,
                    user_id=user_id,
                    feature_id=feature_id,
                    event_id=event_id,
                    rule_id=rule_id,
                    amount=amount,
                    occurred_at=occurred_at,
                )
                for feature_id, amount, rule_id in decision.usages
            )
        mapped = 0
        if usages:
            Usage.objects.bulk_create(usages, ignore_conflicts=True, batch_size=2000)
            mapped = Event.objects.filter(id__in=mapped_ids, status=EventStatus.UNMAPPED).update(
                status=EventStatus.MAPPED, unmapped_reason=""
            )
        finished = len(rows) < chunk_size
        updates = {
            "scanned": F("scanned") + len(rows),
            "mapped": F("mapped") + mapped,
            "heartbeat_at": timezone.now(),
        }
        if rows:
            updates["cursor"] = rows[-1][0]
        if finished:
            updates.update(status=JobStatus.DONE, finished_at=timezone.now())
        ReprocessingJob.objects.filter(pk=job_id).update(**updates)
    return ChunkResult(len(rows), mapped, finished)


def fail_job(job_id: int, error: str) -> None:
    ReprocessingJob.objects.filter(pk=job_id).exclude(status=JobStatus.DONE).update(
        status=JobStatus.FAILED, error=error[:2000], finished_at=timezone.now()
    )


def stalled_job_ids() -> list[int]:
    """Jobs to send again: queued ones never picked up (the broker was down when they were
    created) and running ones whose worker stopped sending heartbeats (it died)."""
    cutoff = timezone.now() - timezone.timedelta(seconds=settings.KANA_JOB_STALE_SECONDS)
    queued = ReprocessingJob.objects.filter(status=JobStatus.QUEUED, created_at__lt=cutoff)
    stalled = ReprocessingJob.objects.filter(status=JobStatus.RUNNING, heartbeat_at__lt=cutoff)
    return sorted(set(queued.values_list("id", flat=True)) | set(stalled.values_list("id", flat=True)))
