"""The users an import's rows named (``TouchedUsers``, for ``duplicate_row``): the users a chunk
created are remembered without conflict handling, the others with it, and a later row naming
either is the duplicate of the row that named it first, whatever chunk that was in."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from users import csv_import
from users.identity import TouchedUsers
from users.models import EndUser, ImportStatus

from .csv_helpers import csv_bytes, identify, run_import
from .test_csv_import_pipeline import full_report

pytestmark = pytest.mark.django_db

# Above the engine's bulk threshold (identity._BULK_MIN_ROWS): each chunk COPYs its users.
CHUNK = 10


def rows_over_three_chunks() -> list[dict]:
    """Chunk 1 (rows 2-11) only creates; chunk 2 (rows 12-21) creates, updates an existing user
    and names two users of chunk 1; chunk 3 (rows 22-31) names users of chunks 1 and 2."""
    first = [{"user_id": f"a{i}", "email": f"a{i}@example.com"} for i in range(CHUNK)]
    second = [{"user_id": f"b{i}", "name": f"B {i}"} for i in range(7)]
    second += [
        {"user_id": "old", "name": "Old again"},  # row 19: updates an existing user
        {"user_id": "a3", "name": "again"},  # row 20: a3 was created by row 5
        {"email": "A7@example.com"},  # row 21: a7's email, created by row 9
    ]
    third = [{"user_id": f"c{i}"} for i in range(6)]
    third += [
        {"user_id": "b2", "name": "again"},  # row 28: b2 was created by row 14
        {"user_id": "old", "name": "third time"},  # row 29: old was updated by row 19
        {"user_id": "c0"},  # row 30: created by row 22, in this very chunk
        {"user_id": "a0", "email": "a0@example.com"},  # row 31: created by row 2
    ]
    return first + second + third


def test_later_rows_naming_created_or_updated_users_are_duplicates_of_the_first_row(tenant, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", CHUNK)
    identify(tenant.workspace, "old", name="Old")

    job = run_import(tenant.workspace, csv_bytes(rows_over_three_chunks()))

    assert job.status == ImportStatus.DONE and not job.applied
    errors = {int(row[0]): row[2] for row in full_report(job)[1:] if row[1] == "error"}
    assert errors == {
        20: "the same user is already named by row 5",
        21: "the same user is already named by row 9",
        28: "the same user is already named by row 14",
        29: "the same user is already named by row 19",
        30: "the same user is already named by row 22",
        31: "the same user is already named by row 2",
    }
    assert job.counts() == {"created": 23, "updated": 1, "merged": 0, "unchanged": 0, "error": 6}
    # All or nothing: the errors left nothing applied.
    assert list(EndUser.objects.for_workspace(tenant.workspace).values_list("user_id", "name")) == [("old", "Old")]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the temporary table is PostgreSQL's")
def test_a_chunks_created_users_are_inserted_without_on_conflict(tenant, monkeypatch):
    """Their ids were just drawn from the sequence: no earlier pair has them. Fails on main,
    where every pair went through ``ON CONFLICT … DO UPDATE``."""
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", CHUNK)
    identify(tenant.workspace, "old", name="Old")
    rows = rows_over_three_chunks()[: 2 * CHUNK]

    with CaptureQueriesContext(connection) as queries:
        job = run_import(tenant.workspace, csv_bytes(rows))

    assert job.status == ImportStatus.DONE
    writes = [
        q["sql"]
        for q in queries
        if q["sql"].lstrip().upper().startswith(("INSERT", "WITH")) and "kana_csv_touched_users" in q["sql"]
    ]
    assert len(writes) == 2  # one statement a chunk
    only_created, mixed = writes
    assert "ON CONFLICT" not in only_created
    # Chunk 2: its 7 created users in the plain insert, the updated one through the upsert.
    assert mixed.startswith("WITH created AS (INSERT INTO kana_csv_touched_users")
    assert mixed.count("ON CONFLICT") == 1


def test_touched_users_remember_created_pairs_and_replace_the_label_of_a_named_one(tenant):
    touched = TouchedUsers()
    first = EndUser.objects.create(workspace=tenant.workspace, user_id="x")
    second = EndUser.objects.create(workspace=tenant.workspace, user_id="y")

    touched.update([(first.pk, "row 2")], created=[(second.pk, "row 3")])
    touched.update([(first.pk, "row 9")])
    touched.update([], created=[(second.pk + 1000, "row 10")])

    assert touched.labels_of([first.pk, second.pk, second.pk + 1000, second.pk + 2000]) == {
        first.pk: "row 9",
        second.pk: "row 3",
        second.pk + 1000: "row 10",
    }


def test_a_created_user_named_again_takes_the_later_label(tenant):
    """A created user named again by a later row: that row's label replaces its creator's
    (the engine reports the latest row that named a user), in any chunk."""
    touched = TouchedUsers()
    created = [EndUser.objects.create(workspace=tenant.workspace, user_id=f"c{i}") for i in range(3)]

    touched.update([], created=[(user.pk, f"row {i + 2}") for i, user in enumerate(created)])
    touched.update([(created[1].pk, "row 40")], created=[(created[2].pk + 500, "row 41")])

    assert touched.labels_of([user.pk for user in created]) == {
        created[0].pk: "row 2",
        created[1].pk: "row 40",
        created[2].pk: "row 4",
    }
    assert touched.labels_of([created[2].pk + 500, created[2].pk + 499]) == {created[2].pk + 500: "row 41"}
