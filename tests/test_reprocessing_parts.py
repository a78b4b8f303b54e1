"""A reprocessing job created as parts that share its range (``reprocessing.job_parts``):
each part claims the next chunk of the job's candidates when its slice is walked, so the
parts hold near-equal shares however the candidates lie; the rule's progress summed over the
parts, the workspace's job limit counting the parts of one job as one, a failed part, a
rolled-back chunk giving its claim back, and two real workers running one rule's parts at
once (every event mapped once, counters exact, no deadlock)."""

from datetime import timedelta

import pytest
import redis
from django.conf import settings as django_settings
from django.db import transaction
from django.db.models import Q

from features.counters import counter_differences
from features.models import Event, EventStatus, MessageType, ReprocessingJob, UnmappedReason, Usage
from features.reprocessing import claim_job_or_wait, job_parts, process_chunk, record_chunk_failure
from features.selectors import reprocessing_of
from features.services import rule_delete
from kana.jobs import Claim, JobStatus
from tests.conftest import make_tenant, requires_broker, wait_until
from tests.usage_support import T0, make_feature, make_rule, make_user, store_unmapped_events

PRO = [{"property": "plan.tier", "operator": "equals", "value": "pro"}]


@pytest.fixture
def small_parts(settings):
    """Chunks of 10 events, 3 parts, a part only for more than 2 chunks of ids."""
    settings.KANA_REPROCESS_CHUNK_SIZE = 10
    settings.KANA_REPROCESS_PARTS = 3
    settings.KANA_REPROCESS_PART_MIN_CHUNKS = 2
    return settings


def _parts(rule) -> list[ReprocessingJob]:
    first = ReprocessingJob.objects.filter(rule=rule, part_of=None).latest("pk")
    return list(ReprocessingJob.objects.filter(Q(pk=first.pk) | Q(part_of=first)).order_by("pk"))


def _run(job: ReprocessingJob) -> None:
    while not process_chunk(job.pk).finished:
        pass


def _a_big_rule_and_a_small_one(tenant) -> tuple[list[ReprocessingJob], ReprocessingJob]:
    """Two rules of one workspace: one over 100 events (3 parts), one over 3 (one part)."""
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, [("E", {})] * 100)
    store_unmapped_events(tenant.workspace, user, [("Small", {})] * 3, prefix="s")
    make_feature(tenant.workspace, "f")
    big = _parts(make_rule(tenant.workspace, "f", event="E", name="big"))
    (small,) = _parts(make_rule(tenant.workspace, "f", event="Small", name="small"))
    return big, small


def _run_in_turn(parts: list[ReprocessingJob]) -> None:
    """One chunk of each unfinished part in turn, as parts on as many workers run."""
    running = list(parts)
    while running:
        running = [part for part in running if not process_chunk(part.pk).finished]


def _store_recent_crowd(workspace, user, *, early: int, sparse_every: int, late: int) -> list[Event]:
    """A new event name that took off lately: ``early`` events of another name with one "E"
    among every ``sparse_every``, then ``late`` "E" events in a row. Returns the "E" events."""
    specs = [("E" if i % sparse_every == 0 else "Other", {}) for i in range(early)] + [("E", {})] * late
    return [e for e in store_unmapped_events(workspace, user, specs) if e.name == "E"]


def test_parts_share_candidates_crowding_one_end_of_the_range(tenant, small_parts):
    user = make_user(tenant.workspace, "u1")
    # 20 "E" events spread thinly over the first 400 ids, then 160 in a row: the candidates
    # crowd the end of the range. Cut into equal spans of ids, the first part held 10 of the
    # 180 and the last 160 of them, and the job took as long as the last part alone.
    candidates = _store_recent_crowd(tenant.workspace, user, early=400, sparse_every=20, late=160)
    make_feature(tenant.workspace, "f")
    rule = make_rule(tenant.workspace, "f", event="E")
    parts = _parts(rule)
    assert len(parts) == 3

    _run_in_turn(parts)

    parts = _parts(rule)
    shares = [part.scanned for part in parts]
    assert sum(shares) == len(candidates) == 180
    assert max(shares) - min(shares) <= 10, shares  # within one chunk of each other
    assert all(part.status == JobStatus.DONE for part in parts)
    assert Usage.objects.filter(rule=rule).values("event").distinct().count() == 180
    assert Event.objects.filter(pk__in=[e.pk for e in candidates], status=EventStatus.MAPPED).count() == 180


def test_a_parts_slices_follow_each_other_without_gap_or_overlap(tenant, small_parts):
    user = make_user(tenant.workspace, "u1")
    candidates = _store_recent_crowd(tenant.workspace, user, early=100, sparse_every=7, late=40)
    make_feature(tenant.workspace, "f")
    parts = _parts(make_rule(tenant.workspace, "f", event="E"))
    start = candidates[0].pk - 1
    # Every part starts with an empty slice just before the first candidate.
    assert {(p.cursor, p.slice_end) for p in parts} == {(start, start)}

    slices = []
    running = list(parts)
    while running:
        for part in list(running):
            finished = process_chunk(part.pk).finished
            part.refresh_from_db()
            if finished:
                running.remove(part)
            elif (part.cursor, part.slice_end) not in slices:
                slices.append((part.cursor, part.slice_end))

    # Each claim starts where the one before it ended, and holds one chunk of candidates.
    assert slices[0][0] == start and slices[-1][1] == parts[0].last_event_id
    assert all(upper == lower for (_, upper), (lower, _) in zip(slices, slices[1:], strict=False))
    held = [[e.pk for e in candidates if lower < e.pk <= upper] for lower, upper in slices]
    assert [len(h) for h in held[:-1]] == [10] * (len(held) - 1) and 0 < len(held[-1]) <= 10
    assert sorted(pk for h in held for pk in h) == [e.pk for e in candidates]


def test_a_rolled_back_chunk_gives_its_claim_back_and_its_slice_is_walked_once(tenant, small_parts):
    user = make_user(tenant.workspace, "u1")
    events = store_unmapped_events(tenant.workspace, user, [("E", {"plan": {"tier": "pro"}})] * 100)
    make_feature(tenant.workspace, "f")
    rule = make_rule(tenant.workspace, "f", event="E", conditions=PRO)
    first, second, third = _parts(rule)
    process_chunk(first.pk)  # claims its first slice
    first.refresh_from_db()
    claimed = (first.cursor, first.slice_end)

    # A worker dying mid-chunk: the chunk's transaction (its mapping and its next claim) rolls back.
    with pytest.raises(RuntimeError), transaction.atomic():
        process_chunk(first.pk)
        raise RuntimeError("killed")
    first.refresh_from_db()
    assert (first.cursor, first.slice_end, first.scanned) == (*claimed, 0)
    assert not Event.objects.filter(workspace=tenant.workspace, status=EventStatus.MAPPED).exists()

    _run_in_turn([second, third])  # the other parts claim past it: they never walk it
    assert reprocessing_of(rule).scanned == 90
    _run_in_turn([first])  # the successor resumes the slice the part's row records

    progress = reprocessing_of(rule)
    assert (progress.status, progress.scanned, progress.mapped) == ("done", 100, 100)
    assert Usage.objects.filter(rule=rule).values("event").distinct().count() == 100
    assert Event.objects.filter(pk__in=[e.pk for e in events], status=EventStatus.MAPPED).count() == 100
    assert counter_differences(tenant.workspace.pk) == []


def test_small_ranges_and_a_single_part_setting_are_not_split(tenant, small_parts):
    user = make_user(tenant.workspace, "u1")
    # Events of another name first: the job starts just before the rule's first candidate.
    store_unmapped_events(tenant.workspace, user, [("Other", {})] * 15, prefix="o")
    events = store_unmapped_events(tenant.workspace, user, [("E", {})] * 60)
    # 60 ids: not more than 3 parts x 2 chunks x 10 events.
    assert job_parts(tenant.workspace.pk, events[-1].pk, rule=_named("E")) == (events[0].pk - 1, 1)
    more = store_unmapped_events(tenant.workspace, user, [("E", {})] * 100, prefix="more")
    assert job_parts(tenant.workspace.pk, more[-1].pk, rule=_named("E")) == (events[0].pk - 1, 3)
    small_parts.KANA_REPROCESS_PARTS = 1
    assert job_parts(tenant.workspace.pk, more[-1].pk, rule=_named("E")) == (events[0].pk - 1, 1)
    # A new feature's job is never split (its candidates are few; no probe under the lock).
    small_parts.KANA_REPROCESS_PARTS = 3
    assert job_parts(tenant.workspace.pk, more[-1].pk, feature_id=1) == (0, 1)
    # No candidate at all: one empty part.
    assert job_parts(tenant.workspace.pk, more[-1].pk, rule=_named("Nothing")) == (more[-1].pk, 1)


class _named:
    """A rule's shape as ``job_parts`` reads it (its event name)."""

    def __init__(self, event_name):
        self.event_name = event_name


def test_a_rule_over_a_large_range_maps_every_event_once_across_its_parts(tenant, small_parts):
    user = make_user(tenant.workspace, "u1")
    specs = [("E", {"plan": {"tier": "pro" if i % 3 else "free"}}) for i in range(100)]
    events = store_unmapped_events(tenant.workspace, user, specs)
    make_feature(tenant.workspace, "f")
    rule = make_rule(tenant.workspace, "f", event="E", conditions=PRO)

    parts = _parts(rule)
    assert len(parts) == 3
    assert parts[0].part_of_id is None and {p.part_of_id for p in parts[1:]} == {parts[0].pk}
    assert reprocessing_of(rule).status == JobStatus.QUEUED
    assert claim_job_or_wait(parts[1].pk, limit=1) == Claim.CLAIMED
    process_chunk(parts[1].pk)  # an empty slice: claims its first chunk
    process_chunk(parts[1].pk)
    progress = reprocessing_of(rule)
    assert progress.status == JobStatus.RUNNING and progress.scanned == 10
    _run_in_turn(parts)

    progress = reprocessing_of(rule)
    pro = sum(1 for i in range(100) if i % 3)
    assert (progress.status, progress.scanned, progress.mapped, progress.job_id) == ("done", 100, pro, parts[0].pk)
    assert Usage.objects.filter(rule=rule).count() == pro
    assert Usage.objects.filter(rule=rule).values("event").distinct().count() == pro
    assert Event.objects.filter(pk__in=[e.pk for e in events], status=EventStatus.MAPPED).count() == pro
    assert counter_differences(tenant.workspace.pk) == []


def test_a_failed_part_fails_the_rules_progress_and_deleting_the_rule_removes_every_part(tenant, small_parts):
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, [("E", {"plan": {"tier": "free"}})] * 100)
    make_feature(tenant.workspace, "f")
    rule = make_rule(tenant.workspace, "f", event="E", conditions=PRO)  # maps nothing here
    first, second, third = _parts(rule)
    process_chunk(second.pk)  # claims its first slice, then fails on it
    failed = [record_chunk_failure(second.pk, "OperationalError: boom") for _attempt in range(3)]
    assert failed == [False, False, True]

    progress = reprocessing_of(rule)
    assert (progress.status, progress.error) == ("failed", "OperationalError: boom")
    _run_in_turn([first, third])  # the other parts still run the rest of the range
    scanned = ReprocessingJob.objects.filter(pk__in=[first.pk, third.pk]).values_list("scanned", flat=True)
    assert (reprocessing_of(rule).status, reprocessing_of(rule).scanned) == ("failed", sum(scanned))
    assert sum(scanned) == 90  # all but the failed part's slice

    rule_delete(workspace=tenant.workspace, rule=rule)  # nothing mapped: deletable
    assert not ReprocessingJob.objects.filter(pk__in=[first.pk, second.pk, third.pk]).exists()


def test_a_rules_newest_job_is_its_progress_not_an_older_one(tenant, small_parts):
    from features.services import rule_update

    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(tenant.workspace, user, [("E", {})] * 100)
    make_feature(tenant.workspace, "f")
    rule = make_rule(tenant.workspace, "f", event="E", conditions=PRO)
    for part in _parts(rule):
        _run(part)
    rule_update(workspace=tenant.workspace, rule=rule, active=False)
    rule_update(workspace=tenant.workspace, rule=rule, active=True)

    newest = _parts(rule)
    assert newest[0].pk > ReprocessingJob.objects.filter(rule=rule).order_by("pk").first().pk
    progress = reprocessing_of(rule)
    assert (progress.status, progress.scanned, progress.job_id) == ("queued", 0, newest[0].pk)


def test_the_workspace_limit_counts_a_jobs_parts_as_one_job(tenant, small_parts):
    big, small = _a_big_rule_and_a_small_one(tenant)
    other = make_tenant("Other")
    store_unmapped_events(other.workspace, make_user(other.workspace, "u1"), [("E", {})] * 3)
    make_feature(other.workspace, "f")
    (theirs,) = _parts(make_rule(other.workspace, "f", event="E"))
    assert len(big) == 3

    assert [claim_job_or_wait(part.pk, limit=1) for part in big] == [Claim.CLAIMED] * 3
    assert claim_job_or_wait(small.pk, limit=1) == Claim.WAIT  # another rule of the workspace waits
    assert claim_job_or_wait(theirs.pk, limit=1) == Claim.CLAIMED  # another workspace does not
    assert claim_job_or_wait(small.pk, limit=2) == Claim.CLAIMED  # the parts are one job of two

    for part in big:
        _run(part)
    assert [claim_job_or_wait(part.pk, limit=1) for part in big] == [Claim.FINISHED] * 3


def test_a_stalled_part_does_not_count_and_a_part_may_join_its_running_job(tenant, small_parts):
    big, small = _a_big_rule_and_a_small_one(tenant)
    assert claim_job_or_wait(small.pk, limit=1) == Claim.CLAIMED
    assert claim_job_or_wait(big[1].pk, limit=1) == Claim.WAIT
    stale = T0  # long ago: the small job's worker died
    ReprocessingJob.objects.filter(pk=small.pk).update(heartbeat_at=stale)
    assert claim_job_or_wait(big[1].pk, limit=1) == Claim.CLAIMED
    assert claim_job_or_wait(big[0].pk, limit=1) == Claim.CLAIMED


def _store_spread(workspace, total: int, users: int = 20) -> int:
    """``total`` "Report Exported" events over ``users`` users and the same day, two in three
    on the pro plan, crowding the end of the range: one in 20 of the first ``total`` ids, then
    the rest in a row (a new event name that took off lately). Every chunk touches every
    (user, feature, day) counter key. Returns the pro events."""
    people = [make_user(workspace, f"u{n}") for n in range(users)]
    early = [i % 20 == 0 for i in range(total)]
    layout = early + [True] * (total - sum(early))
    events, n = [], 0
    for i, candidate in enumerate(layout):
        events.append(
            Event(
                workspace=workspace,
                message_id=f"spread-{i}",
                type=MessageType.TRACK,
                name="Report Exported" if candidate else "Page Viewed",
                user=people[n % users],
                external_user_id=people[n % users].user_id,
                payload={"properties": {"plan": {"tier": "pro" if n % 3 else "free"}}},
                occurred_at=T0 + timedelta(seconds=n % 3600),
                received_at=T0,
                status=EventStatus.UNMAPPED,
                unmapped_reason=UnmappedReason.NO_MATCHING_RULE,
            )
        )
        n += candidate
    Event.objects.bulk_create(events, batch_size=5000)
    return sum(1 for i in range(total) if i % 3)


@requires_broker
def test_two_workers_share_one_rules_crowded_candidates_mapping_every_event_once(workers, tenant, settings):
    redis.Redis.from_url(django_settings.REDIS_URL).flushdb()
    settings.KANA_REPROCESS_CHUNK_SIZE = 200
    settings.KANA_REPROCESS_PARTS = 2
    settings.KANA_REPROCESS_PART_MIN_CHUNKS = 4
    total = 20_000
    pro = _store_spread(tenant.workspace, total)
    make_feature(tenant.workspace, "pro-exports")
    first = workers(KANA_REPROCESS_CHUNK_SIZE=200, KANA_JOBS_PER_WORKSPACE=1)
    second = workers(KANA_REPROCESS_CHUNK_SIZE=200, KANA_JOBS_PER_WORKSPACE=1)
    # Both workers ready before the parts are sent: else the first one ready could take both
    # parts in turn, on a quiet machine, before the second one listens.
    wait_until(lambda: " ready." in first.output() and " ready." in second.output(), timeout=60, message="workers")
    rule = make_rule(tenant.workspace, "pro-exports", event="Report Exported", conditions=PRO)
    parts = _parts(rule)
    assert len(parts) == 2

    logs = lambda: first.output()[-3000:] + second.output()[-3000:]  # noqa: E731
    wait_until(lambda: reprocessing_of(rule).status in ("done", "failed"), timeout=240, message="the parts finished")
    progress = reprocessing_of(rule)
    assert (progress.status, progress.scanned, progress.mapped) == ("done", total, pro), logs()
    parts = _parts(rule)
    assert all(p.failures == 0 and p.error == "" for p in parts), logs()
    assert "deadlock" not in logs().lower()
    # The parts ran at the same time, not one after the other.
    assert max(p.started_at for p in parts) < min(p.finished_at for p in parts)
    assert Usage.objects.filter(rule=rule).count() == pro
    assert Usage.objects.filter(rule=rule).values("event").distinct().count() == pro
    mapped = Event.objects.filter(workspace=tenant.workspace, status=EventStatus.MAPPED).count()
    assert mapped == pro
    assert counter_differences(tenant.workspace.pk) == []
    # Both parts walked a fair share of the candidates, crowded at one end as they are (cut
    # into equal spans of ids, the first part held one in 20 of them).
    assert min(p.scanned for p in parts) >= total // 5, [p.scanned for p in parts]
