"""Two parts of one rule's job, each running a *mixed* chunk (some events decided in SQL,
some by the evaluator), write the same daily counter keys at the same time in two real
processes. The counters are kept by a statement-level trigger that takes a statement's keys
in key order; a chunk that wrote its usage in two statements (the SQL rows', then the
evaluator's) took its keys in two runs, so two such chunks could cross: part X holds user
A's key and waits for user B's, part Y holds B's and waits for A's, and PostgreSQL aborted
one (docs/reprocessing.md, "The parts"). A chunk now writes all its usage in one statement,
so every writer of a counter key takes its keys in one global order and none can deadlock.

Each process stops after its chunk's first statement (at the evaluator's first decision)
until both are there, then both go on: the crossing is forced, not left to timing.
"""

import os
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest

from features.counters import counter_differences
from features.models import Event, EventStatus, MessageType, ReprocessingJob, UnmappedReason, Usage
from features.reprocessing import process_chunk
from features.selectors import reprocessing_of

from .conftest import ROOT, database_url_for_subprocess, requires_postgres
from .usage_support import T0, make_feature, make_rule, make_user

PRO = [{"property": "plan.tier", "operator": "equals", "value": "pro"}]
IN_SQL = {"plan": {"tier": "pro"}}
# A dotted key the path could name: SQL leaves the row to the evaluator, which matches it.
TO_EVALUATOR = {"plan.tier": "pro"}
PER_GROUP = 20

# One process per part: ``features.reprocessing.process_chunk`` over the part's slice (one
# chunk), paused at the evaluator's first decision (after the chunk's SQL statement) until
# the test writes a line on stdin.
_PART = """
import json, sys
import django
django.setup()
from features import reprocessing
job_id, chunk_size = int(sys.argv[1]), int(sys.argv[2])
decide, paused = reprocessing.decide, []

def decide_after_the_other_part(*args, **kwargs):
    if not paused:
        paused.append(True)
        print("paused", flush=True)
        sys.stdin.readline()
    return decide(*args, **kwargs)

reprocessing.decide = decide_after_the_other_part
try:
    result = reprocessing.process_chunk(job_id, chunk_size)
    print("done", json.dumps([result.scanned, result.mapped, result.finished]), flush=True)
except Exception as error:
    print("error", type(error).__name__, str(error).splitlines()[0] if str(error) else "", flush=True)
"""


def _start_part(job_id: int, chunk_size: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocess(),
        "DJANGO_SETTINGS_MODULE": "kana.settings",
        "KANA_DEBUG": "1",
        "PGAPPNAME": f"lockorder-{uuid.uuid4().hex[:8]}",
    }
    return subprocess.Popen(
        [sys.executable, "-c", _PART, str(job_id), str(chunk_size)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _crossing_events(workspace, first, second) -> list[Event]:
    """Four groups of events in id order, all on one day: the first part's slice holds
    ``first``'s events decided in SQL then ``second``'s left to the evaluator, the second
    part's ``second``'s in SQL then ``first``'s to the evaluator. So each part's SQL statement
    takes one user's counter key and its evaluator's rows need the other user's."""
    groups = [(first, IN_SQL), (second, TO_EVALUATOR), (second, IN_SQL), (first, TO_EVALUATOR)]
    events = [
        Event(
            workspace=workspace,
            message_id=f"cross-{g}-{i}",
            type=MessageType.TRACK,
            name="Report Exported",
            user=user,
            external_user_id=user.user_id,
            payload={"type": "track", "event": "Report Exported", "properties": properties},
            occurred_at=T0 + timedelta(minutes=g * PER_GROUP + i),
            received_at=T0,
            status=EventStatus.UNMAPPED,
            unmapped_reason=UnmappedReason.NO_MATCHING_RULE,
        )
        for g, (user, properties) in enumerate(groups)
        for i in range(PER_GROUP)
    ]
    return Event.objects.bulk_create(events)


@requires_postgres
@pytest.mark.postgres
def test_two_parts_mixed_chunks_crossing_on_counter_keys_never_deadlock(
    transactional_db, tenant, settings, monkeypatch
):
    monkeypatch.setattr("kana.jobs.enqueue_on_commit", lambda *args, **kwargs: None)  # the test runs the parts
    settings.KANA_REPROCESS_CHUNK_SIZE = 10
    settings.KANA_REPROCESS_PARTS = 2
    settings.KANA_REPROCESS_PART_MIN_CHUNKS = 1
    first, second = make_user(tenant.workspace, "a"), make_user(tenant.workspace, "b")
    events = _crossing_events(tenant.workspace, first, second)
    make_feature(tenant.workspace, "exports")
    rule = make_rule(tenant.workspace, "exports", event="Report Exported", conditions=PRO)
    parts = list(ReprocessingJob.objects.filter(rule=rule).order_by("pk"))
    # Each part's first chunk (an empty slice) claims two groups: the slices meet between the
    # second and the third group.
    half = 2 * PER_GROUP
    for part in parts:
        process_chunk(part.pk, half)
        part.refresh_from_db()
    assert [(p.cursor, p.slice_end) for p in parts] == [
        (events[0].pk - 1, events[half - 1].pk),
        (events[half - 1].pk, events[-1].pk),
    ]

    processes = [_start_part(part.pk, chunk_size=half) for part in parts]
    try:
        # Both parts past their SQL statement, before their evaluator's rows are written.
        assert [p.stdout.readline().split() for p in processes] == [["paused"], ["paused"]]
        for process in processes:
            process.stdin.write("\n")
            process.stdin.flush()
        outcomes = [process.communicate(timeout=60)[0].strip() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    # Neither chunk was aborted (a deadlock is an OperationalError the task would retry).
    assert outcomes == [f"done [{half}, {half}, true]"] * 2
    progress = reprocessing_of(rule)
    assert (progress.status, progress.scanned, progress.mapped) == ("done", 4 * PER_GROUP, 4 * PER_GROUP)
    assert Event.objects.filter(workspace=tenant.workspace, status=EventStatus.MAPPED).count() == 4 * PER_GROUP
    assert Usage.objects.filter(rule=rule).count() == 4 * PER_GROUP
    assert Usage.objects.filter(rule=rule).values("event").distinct().count() == 4 * PER_GROUP
    assert counter_differences(tenant.workspace.pk) == []
    assert sorted(Usage.objects.filter(rule=rule).values_list("user__user_id", flat=True).distinct()) == ["a", "b"]
