"""A reprocessing chunk reads and flips its events by primary key, not by scanning the table.

The chunk decided in SQL named its candidates as ``e.id IN (subquery)`` and joined the flip
to them: PostgreSQL hashed the candidate ids and read every event of the table to find
them, twice a chunk (once to decide, once to flip), so each chunk's cost grew with the
stored events and a rule over N events cost O(N²) reads (docs/performance-history.md, "Round 7:
s4hot").
"""

import pytest
from django.db import connection

from features import reprocessing
from features.models import Event, EventStatus, ReprocessingJob, Usage
from tests.conftest import requires_postgres
from tests.usage_support import make_feature, make_rule, make_user, store_unmapped_events

pytestmark = requires_postgres

CHUNK = 200


def _event_nodes(plan: dict):
    if plan.get("Relation Name") == "features_event":
        yield plan
    for child in plan.get("Plans", []):
        yield from _event_nodes(child)


def _all_nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _all_nodes(child)


def _under(node: dict) -> set[str]:
    return {n["Node Type"] for n in _all_nodes(node)}


@pytest.fixture
def chunk_plans():
    """EXPLAIN (FORMAT JSON) of each chunk statement decided in SQL, taken just before it runs."""
    plans = []

    def explain_first(execute, sql, params, many, context):
        if "WITH decided" in sql and not sql.startswith("EXPLAIN"):  # the EXPLAIN passes here too
            cursor = context["cursor"]
            cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
            plans.append(cursor.fetchone()[0][0]["Plan"])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(explain_first):
        yield plans


def test_a_chunk_probes_its_events_by_primary_key(tenant, django_capture_on_commit_callbacks, chunk_plans):
    workspace = tenant.workspace
    user = make_user(workspace, "u1")
    make_feature(workspace, "exports")
    store_unmapped_events(workspace, user, [("Report Exported", {"pages": i % 7}) for i in range(3000)])
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE features_event")
    with django_capture_on_commit_callbacks(execute=False):  # the job runs here, a chunk at a time
        rule = make_rule(workspace, "exports", event="Report Exported", amount_property="pages")
    job = ReprocessingJob.objects.get(rule=rule)

    result = reprocessing.process_chunk(job.pk, chunk_size=CHUNK)

    assert (result.scanned, result.mapped) == (CHUNK, CHUNK)
    assert Usage.objects.filter(workspace=workspace).count() == CHUNK
    assert Event.objects.filter(workspace=workspace, status=EventStatus.MAPPED).count() == CHUNK
    (plan,) = chunk_plans
    nodes = [node for node in _event_nodes(plan) if node["Node Type"] != "ModifyTable"]
    assert nodes
    for node in nodes:
        # The candidates come from the unmapped-by-name index, the rows to decide and to flip
        # from the primary key: no node reads the table's other events.
        assert node["Node Type"] != "Seq Scan", node
        assert node.get("Index Name") in {"event_unmapped_name_idx", "segment_ingest_event_pkey"}, node
    for node in _all_nodes(plan):
        if node["Node Type"] == "Nested Loop":
            # A loop may probe an index per outer row, never rescan a CTE (the chunk's rows)
            # per row: that is quadratic in the chunk size.
            inner = node["Plans"][1]
            assert "CTE Scan" not in _under(inner), node
