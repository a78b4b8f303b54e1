"""Usage ingest does a fixed, small number of queries whatever the batch size (STYLE habit 5).

Per run of usage messages: rules lock + version, replay check, userId lookup, (new users:
user and userId inserts), event insert, usage insert, inside one savepoint or transaction.
The API key and the compiled rules are cached per process, so a warm-up request comes first.
"""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from features.ledger import COPY_MIN_EVENTS
from features.models import Event, Usage
from features.services import RuleDefinition, feature_create, rule_create

from .conftest import is_postgres

# 8 with known users, 10 when users are created (savepoint and release included). The
# rules version is read in its own statement after the shared rules lock (see kana.locks).
MAX_QUERIES = 10
# SQLite splits big inserts (999 parameters per statement): a few more for 100 messages.
MAX_BATCH_QUERIES = 10 if is_postgres() else 13


def tracks(count: int, prefix: str) -> list[dict]:
    return [
        {"type": "track", "userId": f"{prefix}-{i % 50}", "event": "Report Exported", "properties": {"plan": "pro"}}
        for i in range(count)
    ]


@pytest.fixture
def warm(segment, tenant):
    feature_create(workspace=tenant.workspace, key="reports")
    rule_create(
        workspace=tenant.workspace,
        definition=RuleDefinition(name="Exports", feature_key="reports", event_name="Report Exported"),
    )
    assert segment.track("warm-up", "Report Exported").status_code == 200
    return segment


def queries(call) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = call()
    assert response.status_code == 200, response.content
    return len(captured.captured_queries)


def test_a_single_track_runs_a_bounded_number_of_queries(warm, django_assert_max_num_queries):
    with django_assert_max_num_queries(MAX_QUERIES):
        assert warm.track("new-user", "Report Exported").json()["status"] == "mapped"
    with django_assert_max_num_queries(MAX_QUERIES):
        assert warm.track("new-user", "Report Exported").json()["status"] == "mapped"


def test_a_100_message_track_batch_runs_a_bounded_number_of_queries(warm, django_assert_max_num_queries):
    with django_assert_max_num_queries(MAX_BATCH_QUERIES):
        response = warm.batch(tracks(100, "new"))
    assert response.json()["accepted"] == 100

    assert Event.objects.filter(external_user_id__startswith="new-").count() == 100
    assert Usage.objects.filter(user__user_id__startswith="new-").count() == 100


@pytest.mark.skipif(not is_postgres(), reason="SQLite splits large inserts by its parameter limit")
def test_queries_do_not_grow_with_the_batch_size(warm):
    # From COPY_MIN_EVENTS events on, PostgreSQL writes them with COPY (one more query, for the ids).
    small_new = queries(lambda: warm.post("/v1/batch", {"batch": tracks(COPY_MIN_EVENTS, "small")}))
    many_new = queries(lambda: warm.post("/v1/batch", {"batch": tracks(500, "many")}))
    small_known = queries(lambda: warm.post("/v1/batch", {"batch": tracks(COPY_MIN_EVENTS, "small")}))
    many_known = queries(lambda: warm.post("/v1/batch", {"batch": tracks(500, "many")}))
    single_new = queries(lambda: warm.post("/v1/batch", {"batch": tracks(1, "one")}))
    single_known = queries(lambda: warm.post("/v1/batch", {"batch": tracks(1, "one")}))

    assert small_new == many_new
    assert small_known == many_known
    assert small_known < small_new  # the new users' inserts are the only difference
    assert single_known < single_new <= small_new


def test_a_replayed_batch_stops_after_the_replay_check(warm, django_assert_max_num_queries):
    batch = tracks(100, "again")
    for message_no, message in enumerate(batch):
        message["messageId"] = f"again-{message_no}"
    assert warm.batch(batch).status_code == 200

    with django_assert_max_num_queries(5):
        assert warm.batch(batch).json()["duplicates"] == 100
