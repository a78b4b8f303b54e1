"""An entitlement check reads its subject's memberships and subscriptions, whatever the statistics say.

PostgreSQL's statistics lag a workspace that grows fast (a new tenant's first hours). Given
the workspace, the planner put its rows at about one, tied the workspace-only index with the
subject's and read every subscription of the workspace to find the subject's: in the first
plans of each connection's prepared check, and in every check when connections are not kept
(docs/performance-history.md, "Round 15: s2ties").
"""

import pytest
from django.db import connection

from entitlements import reads
from entitlements.models import Package, PackageFeature
from features.models import Feature
from kana.db import prepared
from users.models import Group

from .conftest import make_tenant, requires_postgres


def _scan_nodes(plan: dict):
    if "Relation Name" in plan:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scan_nodes(child)


def _subscribe_everyone(workspace_id: int, prefix: str, count: int) -> None:
    """``count`` users, each with its userId, a subscription to the workspace's package and a
    membership of its one group."""
    package = Package.objects.create(workspace_id=workspace_id, key="plan")
    feature = Feature.objects.create(workspace_id=workspace_id, key="reports")
    PackageFeature.objects.create(workspace_id=workspace_id, package=package, feature=feature, limit=10)
    group = Group.objects.create(workspace_id=workspace_id, group_id="team")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO users_enduser (workspace_id, user_id, name, email, email_key, billing_id, billing_provider,"
            " audiences, created_at, updated_at)"
            " SELECT %s, %s || g, '', '', '', '', '', '[]', now(), now() FROM generate_series(1, %s) AS g",
            [workspace_id, prefix, count],
        )
        cursor.execute(
            "INSERT INTO users_useridentity (workspace_id, user_id, external_id, created_at)"
            " SELECT workspace_id, id, user_id, now() FROM users_enduser WHERE workspace_id = %s",
            [workspace_id],
        )
        cursor.execute(
            "INSERT INTO users_groupmembership (workspace_id, group_id, user_id, joined_at)"
            " SELECT workspace_id, %s, id, now() FROM users_enduser WHERE workspace_id = %s",
            [group.pk, workspace_id],
        )
        cursor.execute(
            "INSERT INTO entitlements_subscription (workspace_id, user_id, package_id, status, started_at,"
            " created_at, updated_at)"
            " SELECT workspace_id, id, %s, 'active', now(), now(), now() FROM users_enduser WHERE workspace_id = %s",
            [package.pk, workspace_id],
        )


@requires_postgres
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
def test_a_check_reads_its_subject_s_subscriptions_and_no_other_when_statistics_lag(tenant, plan_cache_mode):
    _subscribe_everyone(tenant.workspace.pk, "old-", 300)
    with connection.cursor() as cursor:  # statistics from before the new tenant's rows
        for table in ("users_useridentity", "users_groupmembership", "entitlements_subscription"):
            cursor.execute(f"ANALYZE {table}")
    grown = make_tenant("Grown fast")
    _subscribe_everyone(grown.workspace.pk, "new-", 5000)
    name, prepare, execute = prepared._shape(reads._OFFERS_SQL)
    params = {"ws": grown.workspace.pk, "feature": "reports", "user_id": "new-4000", "group_id": None}
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # an earlier test may have prepared the same statement
        prepared.forget_all()
        cursor.execute(prepare)
        cursor.execute(f"SET plan_cache_mode = {plan_cache_mode}")
        try:
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + execute, params)
            (plan,) = cursor.fetchone()[0]
            cursor.execute(execute, params)
            rows = cursor.fetchall()
        finally:
            cursor.execute("RESET plan_cache_mode")
            cursor.execute(f"DEALLOCATE {name}")
    read = [
        node
        for node in _scan_nodes(plan["Plan"])
        if node["Relation Name"] in ("users_groupmembership", "entitlements_subscription")
    ]
    assert {node["Relation Name"] for node in read} == {"users_groupmembership", "entitlements_subscription"}
    for node in read:
        # The subject's one membership and one subscription are read: none of the workspace's others.
        assert node["Actual Rows"] <= 1, node
        assert node.get("Rows Removed by Filter", 0) == 0, node
    assert len(rows) == 1  # the subject's one subscription, its package offering the feature
    assert rows[0][12] is not None
