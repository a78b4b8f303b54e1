"""Usage ingest does a fixed, small number of queries whatever the batch size (STYLE habit 5).

Per run of usage messages: rules lock + version, replay check, userId lookup, (new users:
user and userId inserts), event insert, usage insert, inside one savepoint or transaction.
The API key and the compiled rules are cached per process, so a warm-up request comes first.
"""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from features.ledger import JSON_ROWS_MIN_EVENTS
from features.models import Event, Usage
from features.services import RuleDefinition, feature_create, rule_create
from kana.db import pipelined, prepared

from .conftest import is_postgres, requires_postgres

# 8 with known users, 10 when users are created (savepoint and release included). The
# rules version is read in its own statement after the shared rules lock (see kana.locks).
MAX_QUERIES = 10
# SQLite splits big inserts (999 parameters per statement): a few more for 100 messages.
# PostgreSQL: savepoint, lock + replay read, users read, users insert, suppression read, the
# events' insert, release; plus its PREPARE, the first time on a connection.
MAX_BATCH_QUERIES = 8 if is_postgres() else 13


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
    # From JSON_ROWS_MIN_EVENTS events on, PostgreSQL writes them as JSON documents, in as
    # many queries as a shorter run's rendered INSERT.
    small_new = queries(lambda: warm.post("/v1/batch", {"batch": tracks(JSON_ROWS_MIN_EVENTS, "small")}))
    many_new = queries(lambda: warm.post("/v1/batch", {"batch": tracks(500, "many")}))
    small_known = queries(lambda: warm.post("/v1/batch", {"batch": tracks(JSON_ROWS_MIN_EVENTS, "small")}))
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


# Outside any transaction (as in production: no ATOMIC_REQUESTS), a single usage message on
# PostgreSQL of a userId that has a user is one round trip and one implicit transaction
# (kana.locks.lock_rules_shared_then_run): the shared rules lock's statement, then one
# prepared statement that finds the user, checks the rules version the process decided the
# message with, and inserts the event and its usage (features.ledger.record_known_user_usage).
# Any other single message (a new user, rules that moved) then goes the usual way, in two
# round trips: BEGIN travels with the rules lock, the rules version, the replay check and the
# userId lookup; COMMIT with the event and usage insert (kana.db.pipelined). No health-check
# SELECT 1 either (kana.db.postgresql). The statements are prepared (kana.db.prepared) by
# the first tracks on this connection (see the tests at the end for the first use).
def _round_trips(call) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        response = call()
    assert response.status_code == 200, response.content
    assert not pipelined.in_transaction()
    return [query["sql"] for query in captured.captured_queries]


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_single_track_for_a_known_user_is_one_round_trip(warm):
    first = warm.track("known", "Report Exported")
    assert first.json()["status"] == "mapped"
    sent = _round_trips(lambda: warm.track("known", "Report Exported"))
    assert len(sent) == 1
    lock, insert = sent[0].split("; ")
    assert lock.startswith("SELECT pg_advisory_xact_lock_shared")
    assert insert.startswith("EXECUTE kana_")  # the user's lookup, the version's check and the insert
    assert "BEGIN" not in sent[0] and "COMMIT" not in sent[0]
    assert Usage.objects.filter(user__user_id="known").count() == 2


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_known_user_s_track_after_the_rules_moved_is_decided_again_the_usual_way(warm, tenant):
    assert warm.track("known", "Report Exported").status_code == 200
    feature_create(workspace=tenant.workspace, key="other")  # the rules version moves
    sent = _round_trips(lambda: warm.track("known", "Report Exported"))
    # The one-round-trip statement stores nothing; then the usual two round trips, with the new
    # rules' two reads (features, rules) between them.
    assert [sql.split()[0] for sql in sent] == ["SELECT", "BEGIN;", "SELECT", "SELECT", "EXECUTE"]
    assert "features_feature" in sent[2] and "features_mappingrule" in sent[3]
    assert sent[-1].endswith("; COMMIT")
    # The usual path loaded the new rules: the next track is one round trip again.
    assert len(_round_trips(lambda: warm.track("known", "Report Exported"))) == 1
    assert Usage.objects.filter(user__user_id="known").count() == 3


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_single_track_s_prepared_statements_have_their_values_bound_server_side(warm, monkeypatch):
    """When Django logs nothing (production), the same round trips go as pipelines
    (kana.db.kept_cursor.message_rows): the lock's statement, then the read and the insert by
    their prepared names with their values in Bind messages; no text for psycopg to format.
    The first track of a user goes the usual way (two round trips, after the one that finds
    no user); its user's next one is a single pipeline."""
    from kana.db import kept_cursor

    pipelines = []
    original = kept_cursor._pipeline

    def spy(pgconn, sent):
        pipelines.append([(name, text) for name, text, _values in sent])
        return original(pgconn, sent)

    def refused(*args, **kwargs):
        raise AssertionError("a single track's statement sent as text")

    monkeypatch.setattr(kept_cursor, "_pipeline", spy)
    monkeypatch.setattr(kept_cursor, "rows", refused)
    response = warm.track("bound", "Report Exported", messageId="bound-1")
    assert response.status_code == 200 and response.json()["status"] == "mapped", response.content
    assert len(pipelines) == 3
    (no_user_lock, no_user), (begin, lock, read), (insert, commit) = pipelines
    assert no_user_lock == (None, b"SELECT pg_advisory_xact_lock_shared($1, $2)") and no_user[0].startswith(b"kana_")
    assert begin == (None, b"BEGIN") and lock == (None, b"SELECT pg_advisory_xact_lock_shared($1, $2)")
    assert read[0].startswith(b"kana_") and insert[0].startswith(b"kana_") and commit == (None, b"COMMIT")
    assert not pipelined.in_transaction()

    pipelines.clear()
    response = warm.track("bound", "Report Exported", messageId="bound-2")
    assert response.status_code == 200 and response.json()["status"] == "mapped", response.content
    assert pipelines == [[no_user_lock, no_user]]  # the same prepared statement
    assert not pipelined.in_transaction()
    assert Usage.objects.filter(event__message_id__startswith="bound-").count() == 2


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_single_track_s_first_round_trip_reads_the_rules_version_in_its_replay_read(warm):
    """The usual path (a new user's track): three statements, BEGIN, the shared rules lock,
    the prepared read (replays, the userId's suppression and user, the rules version); no
    rules-version SELECT of its own. A known user's: two, the lock and the prepared insert."""
    warm.track("known", "Report Exported")
    sent = _round_trips(lambda: warm.track("new", "Report Exported"))
    statements = sent[1].split("; ")
    assert [s.split(" ")[0] for s in statements] == ["BEGIN", "SELECT", "EXECUTE"], sent[1]
    assert "rules_version" not in sent[1]
    sent = _round_trips(lambda: warm.track("known", "Report Exported"))
    assert [s.split(" ")[0] for s in sent[0].split("; ")] == ["SELECT", "EXECUTE"], sent[0]
    assert "rules_version" not in sent[0]


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_single_track_for_a_new_user_adds_only_the_user_s_creation(warm):
    assert warm.track("known", "Report Exported").status_code == 200  # prepares the one-round-trip statement
    sent = _round_trips(lambda: warm.track("brand-new", "Report Exported"))
    # The one round trip that finds no user, the usual two, + the user and userId insert, +
    # its suppression re-check (a deletion may have won the race)
    assert len(sent) == 5
    assert sent[0].startswith("SELECT pg_advisory_xact_lock_shared") and sent[1].startswith("BEGIN;")
    assert Event.objects.filter(external_user_id="brand-new", status="mapped").count() == 1


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_replayed_single_track_is_one_round_trip_and_stores_nothing(warm):
    assert warm.track("again", "Report Exported", messageId="same").json()["status"] == "mapped"
    replay = []
    sent = _round_trips(lambda: replay.append(warm.track("again", "Report Exported", messageId="same")) or replay[0])
    assert replay[0].json()["status"] == "duplicate"
    assert len(sent) == 1 and sent[0].startswith("SELECT pg_advisory_xact_lock_shared")
    assert Event.objects.filter(message_id="same").count() == 1
    assert Usage.objects.filter(event__message_id="same").count() == 1


# A batch goes the same way: BEGIN with the first statement (which also reads the userIds'
# users), COMMIT with the event insert, at any length: from JSON_ROWS_MIN_EVENTS events on,
# the rows travel as JSON documents in the same insert (no staging tables, no COPYs).
@requires_postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("count", "insert"), [(JSON_ROWS_MIN_EVENTS - 1, "WITH"), (JSON_ROWS_MIN_EVENTS, "EXECUTE"), (100, "EXECUTE")]
)
def test_a_track_batch_for_known_users_is_one_transaction_of_fixed_round_trips(warm, count, insert):
    # The first batch creates the users (and PREPAREs the JSON rows' insert on this connection).
    assert warm.batch(tracks(count, "known")).status_code == 200
    sent = _round_trips(lambda: warm.batch(tracks(count, "known")))
    assert len(sent) == 2
    assert sent[0].startswith("BEGIN; SELECT pg_advisory_xact_lock_shared")
    assert sent[-1].split()[0] == insert and sent[-1].endswith("; COMMIT")
    assert Usage.objects.filter(user__user_id__startswith="known-").count() == 2 * count


# The single track's statements are prepared once per connection (kana.db.prepared): the
# first track on a connection reads what the server holds and PREPAREs each in a round trip
# of its own (the read's before the transaction opens); every later one sends only the
# round trips above.
def _first_words(sent: list[str]) -> list[str]:
    return [sql.split()[0] for sql in sent]


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_single_track_s_statements_are_prepared_once_per_connection(warm):
    assert warm.track("known", "Report Exported").status_code == 200
    # As a new connection: nothing prepared on the server, nothing recorded for it.
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    prepared.forget_all()
    first = _round_trips(lambda: warm.track("known", "Report Exported"))
    # SELECT: what the server holds; the one-round-trip statement's PREPARE; SELECT: the lock and it.
    assert _first_words(first) == ["SELECT", "PREPARE", "SELECT"]
    assert first[-1].split("; ")[1].startswith("EXECUTE kana_")
    again = _round_trips(lambda: warm.track("known", "Report Exported"))
    assert len(again) == 1 and again[0].startswith("SELECT pg_advisory_xact_lock_shared")
    # A new user's track: the one round trip that finds no user, then the usual path, whose read
    # and insert are prepared the first time too (between them: the user's insert and its
    # suppression re-check).
    new = _round_trips(lambda: warm.track("new", "Report Exported"))
    assert _first_words(new) == ["SELECT", "PREPARE", "BEGIN;", "WITH", "SELECT", "PREPARE", "EXECUTE"], new
    assert new[-1].endswith("; COMMIT")
    assert Usage.objects.filter(user__user_id__in=["known", "new"]).count() == 4


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_track_after_its_statements_were_discarded_is_stored_once_and_they_are_prepared_again(warm):
    assert warm.track("known", "Report Exported").status_code == 200
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # behind the registry's back, as a pooler's new session would
    response = warm.track("known", "Report Exported", messageId="after-deallocate")
    assert response.status_code == 200 and response.json()["status"] == "mapped"
    assert not pipelined.in_transaction()
    assert Event.objects.filter(message_id="after-deallocate").count() == 1
    assert Usage.objects.filter(event__message_id="after-deallocate").count() == 1
    sent = _round_trips(lambda: warm.track("known", "Report Exported"))
    assert len(sent) == 1 and sent[0].startswith("SELECT pg_advisory_xact_lock_shared")


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_batch_after_its_insert_was_discarded_is_stored_once_and_it_is_prepared_again(warm):
    assert warm.batch(tracks(100, "big")).status_code == 200  # creates the users, prepares the insert
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # behind the registry's back, as a pooler's new session would
    batch = [{**message, "messageId": f"after-deallocate-{n}"} for n, message in enumerate(tracks(100, "big"))]
    body = warm.batch(batch).json()
    assert (body["accepted"], body["duplicates"]) == (100, 0)
    assert not pipelined.in_transaction()
    assert Event.objects.filter(message_id__startswith="after-deallocate-").count() == 100
    assert Usage.objects.filter(event__message_id__startswith="after-deallocate-").count() == 100
    assert _first_words(_round_trips(lambda: warm.batch(tracks(100, "big")))) == ["BEGIN;", "EXECUTE"]


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_nothing_is_prepared_for_a_track_when_connections_are_not_kept(warm):
    prepared.forget_all()
    keep = connection.settings_dict["CONN_MAX_AGE"]
    connection.settings_dict["CONN_MAX_AGE"] = 0
    try:
        sent = _round_trips(lambda: warm.track("known", "Report Exported"))
    finally:
        connection.settings_dict["CONN_MAX_AGE"] = keep
    # The one round trip that finds no user, the usual two, + the new user's insert and its
    # suppression re-check
    assert len(sent) == 5
    assert not any("PREPARE" in sql or "EXECUTE" in sql or "pg_prepared_statements" in sql for sql in sent)
    assert sent[0].startswith("SELECT pg_advisory_xact_lock_shared") and "; WITH known AS (" in sent[0]
    assert sent[-1].startswith("WITH ev AS (INSERT INTO features_event")


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_short_run_s_insert_is_not_prepared(warm):
    assert warm.batch(tracks(2, "pair")).status_code == 200  # creates the users
    sent = _round_trips(lambda: warm.batch(tracks(2, "pair")))
    assert _first_words(sent) == ["BEGIN;", "WITH"]  # a 2-event insert is not prepared
    assert "EXECUTE" not in sent[0]  # nor a 2-message read (its array form's plan could scan)


# A single track's usage rows are for the one event its statement has just inserted, one per
# feature, so they go in without ON CONFLICT: no speculative insertion (its lock, the unique
# index probed first, a confirmation record in WAL). The event's insert keeps its own: it is
# what decides a concurrent replay.
@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_single_track_s_usage_is_inserted_without_a_speculative_insertion(warm):
    new_user = _round_trips(lambda: warm.track("known", "Report Exported"))  # the usual path's insert
    known_user = _round_trips(lambda: warm.track("known", "Report Exported"))  # the one-round-trip statement
    for executed in (new_user[-1], known_user[-1].split("; ")[1]):
        name = executed.split()[1].split("(")[0]
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements WHERE name = %s", [name])
            (statement,) = cursor.fetchone()
        event_insert, usage_insert = statement.split("INSERT INTO")[1:]
        assert "ON CONFLICT (workspace_id, message_id) DO NOTHING" in event_insert
        assert "ON CONFLICT" not in usage_insert
    assert Usage.objects.filter(user__user_id="known", event__status="mapped").count() == 2


# Messages of one batch may repeat a messageId: both copies' usage rows join the one event
# stored, so a batch's usage insert keeps skipping the (event, feature) already written.
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("count", [2, JSON_ROWS_MIN_EVENTS])
def test_a_batch_repeating_a_message_id_stores_one_event_and_one_usage_row(warm, count):
    messages = [{**message, "messageId": "twice"} for message in tracks(2, "rep")] + tracks(count - 2, "other")
    assert warm.batch(messages).status_code == 200
    assert Event.objects.filter(message_id="twice").count() == 1
    assert Usage.objects.filter(event__message_id="twice").count() == 1
    assert Usage.objects.filter(user__user_id__startswith="other-").count() == count - 2
