"""kana.db.kept_cursor: a hot statement on a psycopg cursor kept per connection, answering
and failing as Django's cursor does, and logged whenever Django logs statements."""

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext

from kana.db import kept_cursor

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
