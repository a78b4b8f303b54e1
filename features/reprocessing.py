"""Retroactive reprocessing: mapping stored unmapped events after a rule or feature appears.

A job walks the workspace's unmapped events in id order, a chunk per transaction:
1. lock the job row (two runners of one job, e.g. after a redelivery, take turns);
2. take the workspace's rules lock shared, like ingest, and read the rules at that version:
   a rule cannot change while a chunk maps with it;
3. read the next chunk of unmapped events after ``cursor`` and up to ``last_event_id`` (a
   part of a split job: up to the end of its slice, ``slice_end``) (the evaluator's path
   locks them; the SQL path leaves the row locks to its flip, which re-checks each row, see
   ``_decided_in_sql``);
4. decide each event with the same evaluator as ingest (``features.mapping.decide``);
5. flip the mapped events' status in one UPDATE that only touches rows still unmapped, and
   record usage for exactly the rows it flipped (ON CONFLICT DO NOTHING on (event, feature)),
   all of a chunk's usage in one INSERT: the counters' trigger then takes the chunk's counter
   keys in key order, so chunks running at once (a job's parts) cannot deadlock on them;
6. advance the cursor and counters (a part whose slice is walked claims the next chunk of
   the job's candidates, ``_claim_next_slice``), and commit.
A worker killed mid-chunk loses only that uncommitted chunk; its successor resumes at the
cursor, and the status check plus the unique (event, feature) constraint make a repeat harmless.
"""

import logging
from collections import defaultdict
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Max, Q
from django.utils import timezone

from kana import jobs
from kana.jobs import JobStatus
from kana.locks import lock_keys, lock_rules_shared
from kana.models import Workspace
from kana.retries import run_with_retries
from users import services as user_services

from . import ledger
from .mapping import decide, load_rule_set
from .models import Event, EventStatus, MappingRule, ReprocessingJob, UnmappedReason
from .preview import decide_chunk_in_sql

logger = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    scanned: int
    mapped: int
    finished: bool


def claim_job(job_id: int) -> bool:
    """Mark a queued (or running: chunks lock the job row, so runners take turns) job as running."""
    return jobs.claim(ReprocessingJob, job_id, take_over_running=True)


def claim_job_or_wait(job_id: int, *, limit: int) -> jobs.Claim:
    """``claim_job`` unless ``limit`` other jobs of the job's workspace are running now: then
    WAIT, and the job stays queued for a later try (the task sends it again). The parts of
    one job count as one job: they run at once, which is what they are for."""
    return jobs.claim_within_limit(
        ReprocessingJob, job_id, take_over_running=True, workspace_limit=limit, same_job_field="part_of"
    )


def _candidate_events(job: ReprocessingJob):
    """The job's candidates after its cursor: up to its slice's end for a part of a split job
    (``slice_end``), up to ``last_event_id`` for a job in one part."""
    events = _unmapped_for(job.workspace_id, job.rule, job.feature_id)
    end = job.slice_end if job.slice_end is not None else job.last_event_id
    return events.filter(id__gt=job.cursor, id__lte=end)


def _unmapped_for(workspace_id: int, rule: MappingRule | None, feature_id: int | None):
    events = Event.objects.for_workspace(workspace_id).filter(status=EventStatus.UNMAPPED)
    if feature_id is not None:
        # A new feature only concerns events that named it as featureId.
        events = events.filter(unmapped_reason=UnmappedReason.UNKNOWN_FEATURE)
    elif rule is not None and rule.event_name is not None:
        # Narrow in SQL by the rule's event name; the evaluator decides the rest.
        events = events.filter(name=rule.event_name)
    return events


def job_parts(
    workspace_id: int, last_event_id: int, *, rule: MappingRule | None = None, feature_id: int | None = None
) -> tuple[int, int]:
    """Where a new job starts and how many parts run it: (start cursor, parts). The job maps
    the candidates with ``start < id <= last_event_id``.

    The start is just before the job's first candidate (one probe of an index in id order:
    the workspace's unmapped events by name or by status, cheap under the exclusive rules lock
    ``_start_job`` holds). A job is split into ``KANA_REPROCESS_PARTS`` parts only when its
    range spans more than ``KANA_REPROCESS_PART_MIN_CHUNKS`` chunks of ids per part (the span
    is free to read and bounds the candidates from above): a second worker would not pay for
    its claim on a small job, and small jobs stay one row. The parts do not divide the range
    between them at creation: they claim it a chunk of candidates at a time
    (``_claim_next_slice``), so they share the work however the candidates lie in it.
    """
    if feature_id is not None:
        # A new feature's job is one part from the start: its candidates (events that named
        # the feature's key) are few, and the probe for the first of them would walk every
        # unmapped event of the workspace under the exclusive rules lock that blocks ingest.
        return 0, 1
    candidates = _unmapped_for(workspace_id, rule, None).filter(id__lte=last_event_id).order_by("id")
    first = candidates.values_list("id", flat=True).first()
    start = first - 1 if first is not None else last_event_id
    parts = max(1, settings.KANA_REPROCESS_PARTS)
    if last_event_id - start <= parts * settings.KANA_REPROCESS_PART_MIN_CHUNKS * settings.KANA_REPROCESS_CHUNK_SIZE:
        return start, 1
    return start, parts


def _claim_next_slice(job: ReprocessingJob, chunk_size: int) -> tuple[int, int] | None:
    """The next slice of a split job's range for the part ``job``, as (cursor, slice_end): from
    the end of the last slice any part claimed to the id of the ``chunk_size``-th candidate
    after it (or ``last_event_id``, when fewer are left). None when every slice is claimed.

    Called in the chunk's transaction, which holds the part's row lock and writes the slice
    with the chunk's cursor: a chunk that rolls back gives its claim back with it, and a
    killed worker's successor resumes the slice the part's row records. Claims of one job's
    parts are serialised by a lock taken here, last in the chunk (after the rules lock, the
    events' and the counters' locks) and held only until its commit; the slices' ends are
    read after it, in their own statement, so each claim starts where the one committed
    before it ended: the slices follow each other without gap or overlap.
    """
    first = job.part_of_id or job.pk
    lock_keys([f"reprocessing-job-slices:{first}"])
    parts = ReprocessingJob.objects.filter(Q(pk=first) | Q(part_of_id=first))
    claimed_to = parts.aggregate(end=Max("slice_end"))["end"]
    if claimed_to >= job.last_event_id:
        return None
    # An index walk of one chunk of candidates (event_unmapped_name_idx or event_ws_status_idx).
    ahead = _unmapped_for(job.workspace_id, job.rule, job.feature_id).filter(
        id__gt=claimed_to, id__lte=job.last_event_id
    )
    nth = list(ahead.order_by("id").values_list("id", flat=True)[chunk_size - 1 : chunk_size])
    return claimed_to, nth[0] if nth else job.last_event_id


def process_chunk(job_id: int, chunk_size: int | None = None) -> ChunkResult:
    """Map one chunk of a job's events; a fixed number of queries whatever the chunk size."""
    chunk_size = chunk_size or settings.KANA_REPROCESS_CHUNK_SIZE
    with transaction.atomic():
        job = ReprocessingJob.objects.select_for_update(of=("self",)).select_related("rule").get(pk=job_id)
        if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            return ChunkResult(0, 0, True)
        rule_set = load_rule_set(job.workspace_id, lock_rules_shared(job.workspace_id))
        in_sql = _decided_in_sql(job, rule_set, chunk_size)
        flipped_in_sql = None  # usage of events the SQL statement flipped, written with the evaluator's
        if in_sql is None:
            # Only what the evaluator needs: user and time are joined in SQL when usage is written.
            rows = list(
                _candidate_events(job).order_by("id").select_for_update(of=("self",)).values_list(*_READ)[:chunk_size]
            )
            scanned, last_id, mapped = len(rows), rows[-1][0] if rows else None, 0
        else:
            scanned, last_id, mapped, python_ids, flipped_in_sql = in_sql
            # The rows SQL left to the evaluator, locked already by the statement that decided the rest.
            rows = (
                list(
                    Event.objects.filter(id__in=python_ids, status=EventStatus.UNMAPPED)
                    .order_by("id")
                    .values_list(*_READ)
                )
                if python_ids
                else []
            )
        usages: list[ledger.UsageRow] = []
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
        if mapped_ids or flipped_in_sql:
            # The chunk's one usage write: its counter keys taken in one key order (ledger.map_events).
            mapped += ledger.map_events(job.workspace_id, mapped_ids, usages, flipped_in_sql=flipped_in_sql)
        ledger.set_unmapped_reasons(new_reasons)
        finished = scanned < chunk_size  # no candidate left in the range (or the part's slice)
        updates = {
            "scanned": F("scanned") + scanned,
            "mapped": F("mapped") + mapped,
            "heartbeat_at": timezone.now(),
        }
        if scanned:
            updates.update(cursor=last_id, failures=0)
        if job.slice_end is not None and (finished or last_id == job.slice_end):
            # A part that walked its slice claims the next one with this chunk; it is done
            # when the job's whole range is claimed.
            next_slice = _claim_next_slice(job, chunk_size)
            finished = next_slice is None
            if next_slice is not None:
                updates.update(cursor=next_slice[0], slice_end=next_slice[1], failures=0)
        if finished:
            updates.update(status=JobStatus.DONE, finished_at=timezone.now())
        ReprocessingJob.objects.filter(pk=job_id).update(**updates)
    return ChunkResult(scanned, mapped, finished)


_READ = ("id", "name", "unmapped_reason", "payload__properties", "user_id", "external_user_id")


def _decided_in_sql(
    job: ReprocessingJob, rule_set, chunk_size: int
) -> tuple[int, int | None, int, list[int], ledger.FlippedInSql | None] | None:
    """A rule job's chunk decided and mapped in SQL where the rule's conditions allow it
    (``features.preview.decide_chunk_in_sql``: the rows SQL decides are exactly those the
    evaluator would decide the same way). Returns (rows scanned, the last id, events mapped,
    the ids left to the evaluator, the usage of the mapped events when the chunk left rows to
    the evaluator: written with theirs, in one statement), or None when the chunk goes to Python whole: SQLite, a
    feature's job, a rule no longer active, or a condition SQL cannot express."""
    if connection.vendor != "postgresql" or job.feature_id is not None or job.rule_id is None:
        return None
    rule = next((r for r in rule_set.rules if r.rule_id == job.rule_id), None)
    decision = decide_chunk_in_sql(rule, rule_set) if rule is not None else None
    if decision is None:
        return None
    # Not read FOR UPDATE: the flip's UPDATE takes each row's lock and re-checks the row as it
    # is then (still unmapped, still with a user), and its usage takes the user the UPDATE
    # returns. A merge or deletion that changed a row after this statement's snapshot is
    # waited for and seen by the flip (a row it no longer flips goes to the evaluator, which
    # reads it as it is now); one that starts later waits for this chunk's row locks. Locking
    # the candidates first wrote every row twice (S4 in docs/performance-history.md).
    candidates, params = (_candidate_events(job).order_by("id").values("id")[:chunk_size]).query.sql_with_params()
    table = connection.ops.quote_name(Event._meta.db_table)
    # The candidates as an array, not ``IN (subquery)``: PostgreSQL then probes the primary key
    # for each id; with ``IN`` it hashed the ids and scanned the whole event table per chunk
    # (100,000 rows read for 5,000 decided), a cost that grew with the table (S4 in
    # docs/performance-history.md, "Round 7: s4hot").
    rows = decision.rows(f"FROM {table} e WHERE e.id = ANY(ARRAY({candidates}))")
    decided = f"SELECT r.id, {decision.amount} AS amount, {decision.to_python} AS to_python FROM {rows}"
    return ledger.map_events_decided_in_sql(
        job.workspace_id, decided, list(params), feature_id=rule.feature_id, rule_id=rule.rule_id
    )


def _attach_users(workspace: Workspace, orphans: dict[int, str]) -> None:
    """Give events whose user was deleted (detached, ``user`` null) the user their userId
    resolves to now, created if there is none, as a new track with that userId would get.

    Only events this chunk maps are attached (a few queries, only when there are such
    events). A suppressed userId (its user was deleted, SPEC §12) is never given a user
    again: its events map without one. (Deletions anonymise kept events, so only events
    detached before suppression existed still carry a userId here.)
    """
    suppressed = user_services.suppressed_user_ids(workspace=workspace, user_ids=set(orphans.values()))
    orphans = {event_id: user_id for event_id, user_id in orphans.items() if user_id not in suppressed}
    if not orphans:
        return

    def resolve() -> dict[str, int]:
        with transaction.atomic():  # a savepoint: a userId created concurrently is retried
            return user_services.resolve_users(workspace=workspace, external_ids=set(orphans.values()))

    user_pks = run_with_retries(resolve)
    ledger.attach_detached_events({event_id: user_pks[user_id] for event_id, user_id in orphans.items()})


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
    jobs.fail(ReprocessingJob, job_id, error)
