"""kana.db.prepared: statements prepared once per connection, executed by name."""

import pytest
from django.db import connection

from kana.db import prepared

from .conftest import requires_postgres


def test_named_parameters_are_numbered_once_each_in_first_use_order():
    name, prepare, execute = prepared._shape("SELECT %(b)s, %(a)s, %(b)s, 5 %% 2")
    assert prepare == f"PREPARE {name} AS SELECT $1, $2, $1, 5 % 2"
    assert execute == f"EXECUTE {name}(%(b)s, %(a)s)"


def test_positional_parameters_are_numbered_in_order():
    name, prepare, execute = prepared._shape("SELECT %s::bigint, %s")
    assert prepare == f"PREPARE {name} AS SELECT $1::bigint, $2"
    assert execute == f"EXECUTE {name}(%s, %s)"
    assert prepared._shape("SELECT 1")[2] == f"EXECUTE {prepared._shape('SELECT 1')[0]}"


def test_mixed_parameters_are_refused():
    with pytest.raises(ValueError):
        prepared._shape("SELECT %s, %(a)s")


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_statement_is_prepared_once_and_runs_with_its_parameters(django_assert_num_queries):
    prepared.forget_all()
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
        with django_assert_num_queries(2):  # what the server holds, then PREPARE
            sql = prepared.statement("SELECT %s::int + %s::int")
        with django_assert_num_queries(0):
            assert prepared.statement("SELECT %s::int + %s::int") == sql
        cursor.execute(sql, [2, 3])
        assert cursor.fetchone() == (5,)


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_no_more_than_the_cap_is_prepared_on_a_connection(monkeypatch):
    prepared.forget_all()
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    monkeypatch.setattr(prepared, "MAX_PER_CONNECTION", 2)
    assert prepared.statement("SELECT 1 + %s::int").startswith("EXECUTE")
    assert prepared.statement("SELECT 2 + %s::int").startswith("EXECUTE")
    assert prepared.statement("SELECT 3 + %s::int") == "SELECT 3 + %s::int"
    assert prepared.statement("SELECT 1 + %s::int").startswith("EXECUTE")  # prepared ones still are


def test_nothing_is_prepared_off_postgresql_or_without_kept_connections(monkeypatch):
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    assert prepared.statement("SELECT %s") == "SELECT %s"


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_statement_with_replan_every_is_prepared_again_after_that_many_uses(django_assert_num_queries):
    """A generic plan is kept until an ANALYZE; one made while a table was empty can tie the
    right index with a wrong one (docs/performance-history.md, "Round 6: s1pg"): ``replan_every``
    bounds how long it lasts, one round trip per that many uses."""
    prepared.forget_all()
    sql = "SELECT %s::int * 2"
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
        with django_assert_num_queries(2):  # what the server holds, then PREPARE
            execute = prepared.statement(sql, replan_every=3)
        cursor.execute(execute, [4])
        for _ in range(2):
            with django_assert_num_queries(0):
                assert prepared.statement(sql, replan_every=3) == execute
            cursor.execute(execute, [4])
        cursor.execute("SELECT prepare_time FROM pg_prepared_statements WHERE name = %s", [prepared._shape(sql)[0]])
        (first_prepared,) = cursor.fetchone()
        with django_assert_num_queries(1) as captured:  # the 4th use: DEALLOCATE and PREPARE again
            assert prepared.statement(sql, replan_every=3) == execute
        assert captured.captured_queries[0]["sql"].startswith("DEALLOCATE ")
        cursor.execute(execute, [5])
        assert cursor.fetchone() == (10,)
        cursor.execute("SELECT prepare_time FROM pg_prepared_statements WHERE name = %s", [prepared._shape(sql)[0]])
        assert cursor.fetchone()[0] > first_prepared
        with django_assert_num_queries(0):
            prepared.statement(sql, replan_every=3)
