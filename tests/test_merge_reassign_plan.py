"""A merge moves the absorbed user's events and usage by probing that user, whatever the statistics say.

PostgreSQL's statistics lag a workspace that grows fast (a new tenant's first hours; the
benchmark's S2, whose workspace starts without events). Estimating its events at about one
row, the planner tied the workspace-only ``(workspace_id, received_at)`` index with the
(workspace, user) one and, with it, read every event of the workspace to find the absorbed
user's: a cost per merge that grew with the workspace (docs/performance-history.md, "Round 14: s2conc").
"""

import pytest
from django.db import connection

from entitlements.models import Package, Reservation, Subscription, SubscriptionMove
from entitlements.receivers import follow_absorbed_user
from entitlements.services import subject_key
from features.ledger import reassign_user
from features.models import Event, Feature
from kana.db import prepared
from users.models import EndUser

from .conftest import make_tenant, requires_postgres


def _scan_nodes(plan: dict):
    if "Relation Name" in plan:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scan_nodes(child)


def _read_nodes_of_each_step(steps, plan_cache_mode: str):
    """Each step prepared as the merge prepares it, run under EXPLAIN ANALYZE with
    ``plan_cache_mode``: its plan's scan nodes, one list a step (the steps' writes are done)."""
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # an earlier test may have prepared the same statements
        prepared.forget_all()
        cursor.execute(f"SET plan_cache_mode = {plan_cache_mode}")
        try:
            for step in steps:
                name, prepare, execute = prepared._shape(step.sql)
                cursor.execute(prepare)
                cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + execute, step.params)
                (plan,) = cursor.fetchone()[0]
                cursor.execute(f"DEALLOCATE {name}")
                yield list(_scan_nodes(plan["Plan"]))
        finally:
            cursor.execute("RESET plan_cache_mode")


def _store_events(workspace_id: int, prefix: str, count: int, user_pk: int | None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO features_event (workspace_id, message_id, type, name, external_user_id, payload,"
            " occurred_at, received_at, status, unmapped_reason, warnings, user_id)"
            " SELECT %s, %s || g, 'track', 'Report Exported', '', '{}', now(), now(), 'unmapped', '', '[]', %s"
            " FROM generate_series(1, %s) AS g",
            [workspace_id, prefix, user_pk, count],
        )


@requires_postgres
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_a_merge_moves_the_absorbed_user_s_events_without_reading_the_workspace_s_others(tenant, plan_cache_mode):
    _store_events(tenant.workspace.pk, "old-", 300, None)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE features_event")  # statistics from before the new tenant's events
        cursor.execute("ANALYZE features_usage")
    grown = make_tenant("Grown fast")
    survivor, absorbed, other = (
        EndUser.objects.create(workspace=grown.workspace, user_id=name) for name in ("survivor", "absorbed", "other")
    )
    _store_events(grown.workspace.pk, "other-", 5000, other.pk)
    _store_events(grown.workspace.pk, "absorbed-", 3, absorbed.pk)
    steps = reassign_user(workspace_id=grown.workspace.pk, absorbed_pk=absorbed.pk, survivor_pk=survivor.pk)
    for nodes in _read_nodes_of_each_step(steps, plan_cache_mode):
        assert nodes
        for node in nodes:
            # Only the absorbed user's rows are read: none of the workspace's others.
            assert node.get("Rows Removed by Filter", 0) == 0, node
    # EXPLAIN ANALYZE ran the updates: the absorbed user's events are the survivor's now.
    assert Event.objects.filter(user_id=survivor.pk).count() == 3
    assert Event.objects.filter(user_id=absorbed.pk).count() == 0
    assert Event.objects.filter(user_id=other.pk).count() == 5000


def _store_subscriptions_and_holds(workspace_id: int, user_pk: int, count: int) -> None:
    """``count`` subscriptions and holds of one user (a package and a feature of their own)."""
    package = Package.objects.create(workspace_id=workspace_id, key=f"plan-{user_pk}")
    feature = Feature.objects.create(workspace_id=workspace_id, key=f"feature-{user_pk}")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO entitlements_subscription (workspace_id, user_id, package_id, status, started_at,"
            " created_at, updated_at) SELECT %s, %s, %s, 'active', now(), now(), now() FROM generate_series(1, %s)",
            [workspace_id, user_pk, package.pk, count],
        )
        cursor.execute(
            "INSERT INTO entitlements_reservation (workspace_id, user_id, subject, feature_id, amount, status,"
            " idempotency_key, expires_at, created_at) SELECT %s, %s, %s, %s, 1, 'held', %s || g, now(), now()"
            " FROM generate_series(1, %s) AS g",
            [workspace_id, user_pk, subject_key(user_pk=user_pk), feature.pk, f"hold-{user_pk}-", count],
        )


@requires_postgres
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_a_merge_moves_the_absorbed_user_s_subscriptions_and_holds_without_reading_the_workspace_s_others(
    tenant, plan_cache_mode
):
    """The entitlements' receiver of a merge (its four statements) reads the absorbed user's
    subscriptions and holds only, with statistics from before the workspace's: a custom plan
    that knew the workspace tied the workspace-only indexes with the user's (or the subject's)
    and read every subscription and hold of the workspace (docs/performance-history.md, "Round 15: s2ties")."""
    for old in EndUser.objects.bulk_create(EndUser(workspace=tenant.workspace, user_id=f"old-{i}") for i in range(100)):
        _store_subscriptions_and_holds(tenant.workspace.pk, old.pk, 3)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE entitlements_subscription")  # statistics from before the new tenant's rows
        cursor.execute("ANALYZE entitlements_reservation")
    grown = make_tenant("Grown fast")
    survivor, absorbed, other = (
        EndUser.objects.create(workspace=grown.workspace, user_id=name) for name in ("survivor", "absorbed", "other")
    )
    _store_subscriptions_and_holds(grown.workspace.pk, other.pk, 5000)
    _store_subscriptions_and_holds(grown.workspace.pk, absorbed.pk, 3)
    steps = follow_absorbed_user(
        EndUser, workspace_id=grown.workspace.pk, absorbed_pk=absorbed.pk, survivor_pk=survivor.pk
    )
    for step_nodes in _read_nodes_of_each_step(steps, plan_cache_mode):
        nodes = [node for node in step_nodes if node["Relation Name"] != "entitlements_subscriptionmove"]
        assert nodes
        for node in nodes:
            # Only the absorbed user's rows are read: none of the workspace's others.
            assert node.get("Rows Removed by Filter", 0) == 0, node
    # EXPLAIN ANALYZE ran the statements: the absorbed user's subscriptions and holds are the survivor's.
    assert Subscription.objects.filter(user_id=survivor.pk).count() == 3
    assert SubscriptionMove.objects.filter(workspace=grown.workspace, from_user_key=absorbed.pk).count() == 3
    assert Reservation.objects.filter(user_id=survivor.pk, subject=subject_key(user_pk=survivor.pk)).count() == 3
    assert Reservation.objects.filter(user_id=other.pk, subject=subject_key(user_pk=other.pk)).count() == 5000
