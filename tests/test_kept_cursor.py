"""kana.db.kept_cursor: a hot statement on a psycopg cursor kept per connection, answering
and failing as Django's cursor does, and logged whenever Django logs statements."""

import json
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from django.db import DatabaseError, DataError, IntegrityError, ProgrammingError, connection, transaction
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext

from kana.db import kept_cursor, pipelined, prepared
from users.models import MergeReason, MergeRecord

from .conftest import requires_postgres

pytestmark = pytest.mark.django_db(transaction=True)


def test_rows_of_the_first_or_a_later_statement_of_the_message():
    assert kept_cursor.rows("SELECT %s, %s", [1, "a"]) == [(1, "a")]
    if connection.vendor == "postgresql":
        assert kept_cursor.rows("SELECT 1; SELECT %s UNION ALL SELECT %s", [2, 3], result=1) == [(2,), (3,)]


@requires_postgres
def test_one_cursor_per_connection_kept_and_a_new_one_after_reconnecting():
    kept_cursor.rows("SELECT 1", [])
    first = kept_cursor._kept[connection.connection][0]
    kept_cursor.rows("SELECT 2", [])
    assert kept_cursor._kept[connection.connection][0] is first
    connection.close()
    assert kept_cursor.rows("SELECT 3", []) == [(3,)]  # opens the connection again, as Django's cursor
    assert kept_cursor._kept[connection.connection][0] is not first


@requires_postgres
def test_statements_are_logged_and_counted_whenever_django_logs_them(django_assert_num_queries):
    kept_cursor.rows("SELECT 1", [])  # a cursor kept already: logging must still see the next ones
    with CaptureQueriesContext(connection) as captured:
        kept_cursor.rows("SELECT %s::int + 1", [41])
    assert [query["sql"] for query in captured.captured_queries] == ["SELECT 41::int + 1"]
    with django_assert_num_queries(1):
        kept_cursor.rows("SELECT 1", [])


@requires_postgres
def test_execute_wrappers_see_the_statement():
    seen = []

    def wrapper(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        assert kept_cursor.rows("SELECT %s::int", [7]) == [(7,)]
    assert seen == ["SELECT %s::int"]


def test_errors_are_djangos_and_mark_the_connection():
    connection.errors_occurred = False
    with pytest.raises(DatabaseError):
        kept_cursor.rows("SELECT * FROM no_such_table_here", [])
    assert connection.errors_occurred  # what the request's end checks the connection for
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE kept_cursor_probe (id integer PRIMARY KEY)")
    try:
        assert kept_cursor.rows("INSERT INTO kept_cursor_probe VALUES (%s) RETURNING id", [1]) == [(1,)]
        with pytest.raises(IntegrityError):
            kept_cursor.rows("INSERT INTO kept_cursor_probe VALUES (%s) RETURNING id", [1])
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE kept_cursor_probe")


def test_a_statement_in_a_broken_atomic_block_is_refused_as_by_django():
    with transaction.atomic():
        with pytest.raises(DatabaseError), transaction.atomic(savepoint=False):
            kept_cursor.rows("SELECT * FROM no_such_table_here", [])
        with pytest.raises(TransactionManagementError):
            kept_cursor.rows("SELECT 1", [])


# --- prepared_rows: a prepared statement's values bound server-side ------------------------

KINDS_SQL = (
    "SELECT %(text)s::text, %(short)s::varchar, %(big)s::bigint, %(small)s::int, %(day)s::date,"
    " %(utc)s::timestamptz, %(india)s::timestamptz, %(nothing)s::text, %(text)s = %(short)s"
)


def _kinds():
    return {
        "text": "O'Brien \\ 100% é \u3000 ; --",
        "short": "O'Brien \\ 100% é \u3000 ; --",
        "big": -(2**62),
        "small": 7,
        "day": date(2026, 2, 28),
        "utc": datetime(2026, 12, 3, 23, 59, 59, 999999, tzinfo=UTC),
        "india": datetime(2026, 12, 3, 5, 30, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        "nothing": None,
    }


def _last_statement_text(pid: int) -> str:
    """What PostgreSQL shows as the backend's last statement, read from another connection."""
    with psycopg.connect(**connection.get_connection_params()) as other:
        return other.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()[0]


@requires_postgres
def test_prepared_rows_bind_every_kind_of_value_server_side_with_the_rows_of_the_executed_text():
    (pid,) = kept_cursor.rows("SELECT pg_backend_pid()", [])[0]
    as_text = kept_cursor.rows(prepared.statement(KINDS_SQL), _kinds())
    assert _last_statement_text(pid).startswith("EXECUTE ")  # the values formatted into the text
    bound = kept_cursor.prepared_rows(KINDS_SQL, _kinds())
    # Bound to the statement PREPARE made: the server shows its text, not an EXECUTE's.
    assert _last_statement_text(pid).startswith("PREPARE ")
    assert bound == as_text
    assert bound[0][0] == _kinds()["text"] and bound[0][6] == _kinds()["india"] and bound[0][8] is True


@requires_postgres
def test_prepared_rows_leave_values_they_do_not_write_to_psycopg():
    sql = "SELECT %(flag)s::boolean, %(amount)s::numeric, %(naive)s::timestamptz"
    params = {"flag": True, "amount": Decimal("Infinity"), "naive": datetime(2026, 12, 3, 12)}
    assert kept_cursor.prepared_rows(sql, params) == kept_cursor.rows(prepared.statement(sql), params)
    for run in (kept_cursor.prepared_rows, lambda sql, params: kept_cursor.rows(prepared.statement(sql), params)):
        with pytest.raises(DataError):  # psycopg refuses a NUL in a text, as before
            run("SELECT %(text)s::text", {"text": "a\x00b"})


@requires_postgres
def test_prepared_rows_errors_are_djangos_and_a_discarded_statement_is_prepared_again():
    sql = "SELECT 10 / %(divisor)s::int"
    assert kept_cursor.prepared_rows(sql, {"divisor": 5}) == [(2,)]
    with pytest.raises(DataError):
        kept_cursor.prepared_rows(sql, {"divisor": 0})
    connection.errors_occurred = False
    with pytest.raises(ProgrammingError):  # more than one row where one is expected
        kept_cursor.prepared_rows("SELECT (SELECT x FROM generate_series(1, %(n)s::int) AS x)", {"n": 2})
    assert connection.errors_occurred  # what the request's end checks the connection for
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # behind the registry's back
    with pytest.raises(DatabaseError) as missing:
        kept_cursor.prepared_rows(sql, {"divisor": 5})
    assert prepared.is_missing(missing.value)
    prepared.forget_if_missing(missing.value)
    assert kept_cursor.prepared_rows(sql, {"divisor": 5}) == [(2,)]


@requires_postgres
def test_prepared_rows_run_inside_the_callers_transaction(django_assert_num_queries):
    sql = "SELECT pg_current_xact_id()::text, %(n)s::int"
    kept_cursor.prepared_rows(sql, {"n": 0})  # prepared before the transaction
    with transaction.atomic():
        first = kept_cursor.prepared_rows(sql, {"n": 1})  # the transaction's first statement
        second = kept_cursor.prepared_rows(sql, {"n": 2})
        (third,) = kept_cursor.rows("SELECT pg_current_xact_id()::text", [])
    assert first[0][0] == second[0][0] == third[0]
    outside = kept_cursor.prepared_rows(sql, {"n": 3})
    assert outside[0][0] != first[0][0]
    with django_assert_num_queries(1):  # logged and counted as any statement whenever Django counts
        assert kept_cursor.prepared_rows(sql, {"n": 4})[0][1] == 4


# --- message_rows: statements in one round trip, prepared ones' values bound server-side -----

LOCK_SQL = "SELECT pg_advisory_xact_lock_shared(%s, %s)"
POSITIONAL_KINDS_SQL = (
    "SELECT %s::text, %s::varchar, %s::bigint, %s::int, %s::date, %s::timestamptz, %s::timestamptz, %s::text,"
    " %s::numeric, %s::numeric"
)


def _positional_kinds() -> list:
    return [*_kinds().values(), Decimal("1.000000000"), Decimal("-12.5E+3")]


def _message_rows_without_text(statements, **kwargs):
    """``message_rows`` where the text path (``rows``) fails: the rows came through the pipeline."""

    def refused(*args, **kwargs):
        raise AssertionError("sent as text")

    original, kept_cursor.rows = kept_cursor.rows, refused
    try:
        return kept_cursor.message_rows(statements, **kwargs)
    finally:
        kept_cursor.rows = original


@requires_postgres
def test_message_results_give_each_statements_rows_bound_with_one_dict_as_the_one_message_text():
    # The consume's second round trip: named values shared by the message's statements, some
    # prepared, some not, one without parameters; every statement's rows, none for BEGIN/COMMIT.
    params = _kinds() | {"n": 4}
    statements = [
        kept_cursor.Statement("BEGIN", params),
        kept_cursor.Statement(KINDS_SQL, params, prepare=True),
        kept_cursor.Statement("SELECT %(n)s::int + 1, %(small)s::int", params),
        kept_cursor.Statement("SELECT x FROM generate_series(1, %(n)s::int) AS x", params, prepare=True),
        kept_cursor.Statement("COMMIT", params),
    ]
    as_text = kept_cursor._as_one_message(statements, tuple(range(5)))
    original, kept_cursor._as_one_message = kept_cursor._as_one_message, None  # bound, or it fails
    try:
        bound = kept_cursor.message_results(statements)
        assert kept_cursor.message_results(statements, wanted=(3, 2)) == [bound[3], bound[2]]
    finally:
        kept_cursor._as_one_message = original
    assert bound == as_text
    assert bound[0] == bound[4] == [] and bound[2] == [(5, 7)] and bound[3] == [(1,), (2,), (3,), (4,)]
    assert list(bound[1][0]) == [*_kinds().values()][:7] + [None, True]
    assert not pipelined.in_transaction()


@requires_postgres
def test_message_rows_bind_every_kind_of_value_with_the_rows_of_the_one_message_text():
    statements = [
        kept_cursor.Statement("SELECT %s::int + 1", [1]),
        kept_cursor.Statement(POSITIONAL_KINDS_SQL, _positional_kinds(), prepare=True),
    ]
    (as_text,) = kept_cursor._as_one_message(statements, (1,))
    bound = _message_rows_without_text(statements, result=1)
    assert bound == as_text
    assert list(bound[0]) == [*_positional_kinds()[:7], None, *_positional_kinds()[8:]]
    assert _message_rows_without_text(statements) == [(2,)]


def _django_values() -> list:
    """Values as Django's fields prepare them for psycopg 3 (a merge's ledger row): an
    ``Int8`` (a foreign key), a text choice, a bool, a ``Jsonb`` with Django's own ``dumps``."""
    snapshot = MergeRecord._meta.get_field("absorbed_snapshot")
    survivor_key = MergeRecord._meta.get_field("survivor_key")
    flag = MergeRecord._meta.get_field("billing_conflict")
    return [
        survivor_key.get_db_prep_save(2**40, connection),
        MergeReason.IDENTIFY,
        flag.get_db_prep_save(True, connection),
        flag.get_db_prep_save(False, connection),
        snapshot.get_db_prep_save({"name": "O'Brien é", "at": "2026-12-04T00:00:00Z", "n": [1, None]}, connection),
    ]


DJANGO_VALUES_SQL = "SELECT %s::bigint, %s::text, %s::boolean, %s::boolean, %s::jsonb"


@requires_postgres
def test_message_rows_bind_django_s_field_values_with_the_rows_of_the_one_message_text():
    values = _django_values()
    assert [type(v).__name__ for v in values] == ["Int8", "MergeReason", "bool", "bool", "Jsonb"]
    statements = [kept_cursor.Statement(DJANGO_VALUES_SQL, values, prepare=True)]
    bound = _message_rows_without_text(statements)
    assert bound == kept_cursor._as_one_message(statements, (0,))[0]
    assert bound[0][:4] == (2**40, "identify", True, False)
    assert json.loads(bound[0][4]) == {
        "name": "O'Brien é",
        "at": "2026-12-04T00:00:00Z",
        "n": [1, None],
    }  # Django loads JSON


def _message_results_without_text(statements):
    def refused(*args, **kwargs):
        raise AssertionError("sent as text")

    original, kept_cursor._as_one_message = kept_cursor._as_one_message, refused
    try:
        return kept_cursor.message_results(statements)
    finally:
        kept_cursor._as_one_message = original


@requires_postgres
def test_message_results_give_every_statement_s_rows_as_the_one_message_text(probe_insert):
    statements = [
        kept_cursor.Statement("BEGIN"),
        kept_cursor.Statement(LOCK_SQL, [1, 99]),
        kept_cursor.Statement("SELECT %s::int + 1 WHERE false", [1], prepare=True),
        probe_insert,
        kept_cursor.Statement(POSITIONAL_KINDS_SQL, _positional_kinds(), prepare=True),
        kept_cursor.Statement("UPDATE message_rows_probe SET id = id + %s", [1], prepare=True),
        kept_cursor.Statement("SELECT id FROM message_rows_probe"),
        kept_cursor.Statement("ROLLBACK"),
    ]
    bound = _message_results_without_text(statements)
    as_text = kept_cursor._as_one_message(statements, tuple(range(len(statements))))
    assert bound == as_text
    assert bound == [
        [],
        [("",)],
        [],
        [(1,)],
        [tuple(_positional_kinds()[:7]) + (None,) + tuple(_positional_kinds()[8:])],
        [],
        [(2,)],
        [],
    ]
    assert connection.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


@requires_postgres
def test_message_results_are_sent_as_one_logged_message_whenever_django_logs():
    statements = [kept_cursor.Statement("SELECT %s::int", [1]), kept_cursor.Statement("SELECT %s::text", ["a"])]
    with CaptureQueriesContext(connection) as captured:
        assert kept_cursor.message_results(statements) == [[(1,)], [("a",)]]
    assert [query["sql"] for query in captured.captured_queries] == ["SELECT 1::int; SELECT 'a'::text"]


@requires_postgres
def test_message_rows_leave_values_they_do_not_write_to_the_one_message_text():
    sql = "SELECT %s::boolean, %s::numeric, %s::timestamptz"
    params = [True, Decimal("Infinity"), datetime(2026, 12, 3, 12)]
    seen = []
    original = kept_cursor._fetch_each

    def spy(cursor, sql, params, wanted):
        seen.append(sql)
        return original(cursor, sql, params, wanted)

    kept_cursor._fetch_each = spy
    try:
        got = kept_cursor.message_rows([kept_cursor.Statement(sql, params, prepare=True)])
    finally:
        kept_cursor._fetch_each = original
    assert seen == [prepared.statement(sql)] and got == kept_cursor.rows(prepared.statement(sql), params)


@pytest.fixture
def probe_insert():
    """A scratch table's prepared INSERT of the row 1, the table dropped afterwards."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE message_rows_probe (id integer PRIMARY KEY)")
    try:
        yield kept_cursor.Statement("INSERT INTO message_rows_probe VALUES (%s) RETURNING id", [1], prepare=True)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE message_rows_probe")


@requires_postgres
def test_message_rows_open_and_commit_a_transaction_in_one_round_trip_each(probe_insert):
    insert = probe_insert
    rows = _message_rows_without_text(
        [kept_cursor.Statement("BEGIN"), kept_cursor.Statement(LOCK_SQL, [1, 99]), insert], result=2
    )
    assert rows == [(1,)]
    assert connection.connection.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    with psycopg.connect(**connection.get_connection_params()) as other:
        assert other.execute("SELECT count(*) FROM message_rows_probe").fetchone() == (0,)
        held = other.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 99").fetchone()
        assert held == (1,)  # the lock's statement ran, in the transaction
    assert _message_rows_without_text([kept_cursor.Statement("COMMIT")]) == []
    assert connection.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with psycopg.connect(**connection.get_connection_params()) as other:
        assert other.execute("SELECT count(*) FROM message_rows_probe").fetchone() == (1,)


@requires_postgres
def test_a_failed_statement_skips_the_commit_after_it_and_leaves_the_transaction_aborted(probe_insert):
    insert = probe_insert
    kept_cursor.message_rows([insert])  # autocommit: stored
    _message_rows_without_text([kept_cursor.Statement("BEGIN"), kept_cursor.Statement(LOCK_SQL, [1, 99])])
    with pytest.raises(IntegrityError):  # Django's error class
        _message_rows_without_text([insert, kept_cursor.Statement("COMMIT")])
    # As after one message "EXECUTE …; COMMIT" whose EXECUTE failed: the caller rolls back.
    assert connection.connection.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    with connection.cursor() as cursor:
        cursor.execute("ROLLBACK")
    assert _message_rows_without_text([kept_cursor.Statement("SELECT %s::int", [5])]) == [(5,)]


@requires_postgres
def test_message_rows_report_a_discarded_statement_as_missing_and_prepare_it_again():
    statements = [kept_cursor.Statement("SELECT 10 / %s::int", [5], prepare=True)]
    assert kept_cursor.message_rows(statements) == [(2,)]
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # behind the registry's back
    with pytest.raises(DatabaseError) as missing:
        _message_rows_without_text(statements)
    assert prepared.is_missing(missing.value)
    prepared.forget_if_missing(missing.value)
    assert _message_rows_without_text(statements) == [(2,)]


@requires_postgres
def test_message_rows_in_an_atomic_block_are_sent_as_one_message_in_its_transaction():
    sql = "SELECT pg_current_xact_id()::text, %s::int"
    kept_cursor.message_rows([kept_cursor.Statement(sql, [0], prepare=True)])  # prepared before
    with transaction.atomic():
        # psycopg has yet to send atomic's BEGIN: the statements go as text, after it.
        first = kept_cursor.message_rows([kept_cursor.Statement(sql, [1], prepare=True)])
        second = _message_rows_without_text([kept_cursor.Statement(sql, [2], prepare=True)])
        (third,) = kept_cursor.rows("SELECT pg_current_xact_id()::text", [])
    assert first[0][0] == second[0][0] == third[0]


@requires_postgres
def test_a_pipeline_whose_results_are_left_unread_closes_its_connection():
    kept_cursor.rows("SELECT 1", [])
    raw = connection.connection
    pipeline = kept_cursor._pipeline(raw.pgconn, [(None, b"SELECT pg_sleep(0.2)", [])])
    next(pipeline)  # sent; now waiting for the result
    pipeline.close()  # as when a wait is interrupted
    assert raw.closed  # not left in pipeline mode for the next request
    connection.close()
    assert kept_cursor.rows("SELECT 2", []) == [(2,)]  # a new connection


@requires_postgres
def test_the_kept_loaders_read_each_statements_own_columns_in_djangos_time_zone():
    # One set of loaders per kept cursor, reused statement after statement: each result's rows
    # still come with its own columns' types.
    at = datetime(2026, 12, 4, 13, 0, tzinfo=timezone(timedelta(hours=2)))
    first = kept_cursor.prepared_rows("SELECT %(at)s::timestamptz, %(n)s::int", {"at": at, "n": 1})
    second = kept_cursor.prepared_rows("SELECT %(n)s::text, %(at)s::timestamptz", {"at": at, "n": "x"})
    third = kept_cursor.message_results(
        [
            kept_cursor.Statement("SELECT %s::date, %s::numeric", [date(2026, 12, 4), Decimal("1.5")]),
            kept_cursor.Statement("SELECT %s::timestamptz", [at], prepare=True),
        ]
    )
    assert first == [(at, 1)] and first[0][0].tzinfo == UTC
    assert second == [("x", at)] and second[0][1].tzinfo == UTC
    assert third == [[(date(2026, 12, 4), Decimal("1.5"))], [(at,)]] and third[1][0][0].tzinfo == UTC
