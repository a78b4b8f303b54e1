"""A single track's usage moves its daily counter and touched key exactly as the usage
insert trigger counts every usage statement (migrations 0005 and 0009): a zero amount touches
its key without a counter, a replay moves nothing.

PostgreSQL only: the statement-level trigger with its transition table is PostgreSQL's (SQLite
has row triggers and no touched keys drained the same way). Transactional, so that a single
track goes as production sends it: two pipelined round trips, its COMMIT with the insert.
(Round 16's s1pg measured a form in which the track's statement kept its counter itself and the
trigger skipped it; not merged: docs/performance-history.md, "Round 16: s1pg".)
"""

from datetime import date
from decimal import Decimal

import pytest

from features.counters import counter_differences, drain_touched_usage
from features.models import Usage, UsageCounter
from tests.conftest import requires_postgres
from tests.usage_support import make_feature

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]


def track(segment, user_id, *, at="2025-01-10T12:00:00Z", delta=1, message_id=None):
    fields = {"timestamp": at} | ({"messageId": message_id} if message_id else {})
    response = segment.track(user_id, "Used", {"featureId": "exports", "delta": delta}, **fields)
    assert response.status_code == 200, response.content
    return response.json()["status"]


def counted(workspace) -> dict:
    return {(c.user_id, c.day.isoformat()): Decimal(c.amount) for c in UsageCounter.objects.for_workspace(workspace)}


def test_a_zero_delta_writes_no_counter_but_touches_its_key_as_the_trigger_does(tenant, segment):
    feature = make_feature(tenant.workspace, "exports")
    assert track(segment, "u1", delta=0) == "mapped"
    assert counted(tenant.workspace) == {}
    user_pk = Usage.objects.get(workspace=tenant.workspace).user_id
    assert drain_touched_usage() == [(tenant.workspace.pk, user_pk, feature.pk, date(2025, 1, 10))]


def test_a_replayed_single_track_moves_no_counter(tenant, segment):
    make_feature(tenant.workspace, "exports")
    assert track(segment, "u1", delta=3, message_id="once") == "mapped"
    assert track(segment, "u1", delta=3, message_id="once") == "duplicate"
    assert list(counted(tenant.workspace).values()) == [3]
    assert counter_differences(tenant.workspace.pk) == []
