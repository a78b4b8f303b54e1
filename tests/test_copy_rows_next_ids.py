"""``kana.copy_rows.next_ids``: ids drawn from a table's own sequence, the sequence looked up
once per statement (as ``nextval``'s inline argument it was looked up for every id: four
catalog buffer reads an id, ten times the cost of ``nextval``; a CSV import draws one per
created user)."""

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from kana.copy_rows import next_ids
from users.models import EndUser

from .conftest import make_tenant, requires_postgres

pytestmark = [pytest.mark.django_db, requires_postgres]


def test_the_ids_are_distinct_increasing_and_not_handed_out_again(db):
    drawn = next_ids(EndUser._meta.db_table, 500)
    assert len(drawn) == 500
    assert drawn == sorted(set(drawn))
    # The table's own sequence: a user inserted afterwards gets a later id.
    user = EndUser.objects.create(workspace=make_tenant("ids").workspace, user_id="after")
    assert user.pk > drawn[-1]
    assert next_ids(EndUser._meta.db_table, 3)[0] > user.pk


def test_the_sequence_is_looked_up_once_not_once_per_id(db):
    count = 1000
    with CaptureQueriesContext(connection) as captured:
        next_ids(EndUser._meta.db_table, count)
    (statement,) = [q["sql"] for q in captured.captured_queries if "nextval" in q["sql"]]
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}")
        (plan,) = cursor.fetchone()
    if isinstance(plan, str):
        plan = json.loads(plan)
    top = plan[0]["Plan"]
    # One buffer an id is nextval's own (the sequence's page); the inline lookup read four.
    assert top["Shared Hit Blocks"] + top["Shared Read Blocks"] <= count * 1.1, top
