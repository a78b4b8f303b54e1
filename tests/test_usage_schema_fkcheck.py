"""The usage table's implied references have no database constraint (migration
features/0007, docs/architecture.md "Who writes which table"): a usage row's workspace,
feature and rule. What their constraints guarded still holds: the ledger writes a usage
row's workspace from its event's, a feature or rule with usage cannot be deleted, and
Django's on_delete still cascades, protects or nulls."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from django.db import connection, connections, transaction
from django.db.models import F, ProtectedError

from features import ledger
from features.models import Event, EventStatus, Feature, MappingRule, Usage, UsageCounter
from features.services import FeatureError, feature_delete
from kana.locks import lock_rules_shared
from kana.models import Workspace

from .api_support import feature, rule
from .conftest import SegmentClient, make_tenant, requires_postgres

pytestmark = pytest.mark.django_db

# The foreign keys each hot table keeps: every one is a deferred check per written row at
# COMMIT, so a new one here is a cost a track or a batch pays (docs/performance.md).
EXPECTED_FOREIGN_KEYS = {
    "features_event": {("workspace_id", "kana_workspace"), ("user_id", "users_enduser")},
    "features_usage": {("user_id", "users_enduser")},
    "features_usagecounter": set(),
    "features_usagetouch": set(),
}


@requires_postgres
def test_the_hot_tables_keep_only_the_foreign_keys_that_carry_a_guarantee():
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT c.conrelid::regclass::text, a.attname, c.confrelid::regclass::text,
                c.condeferrable, c.condeferred
            FROM pg_constraint c
            JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)
            WHERE c.contype = 'f' AND c.conrelid::regclass::text = ANY(%s)
            """,
            [list(EXPECTED_FOREIGN_KEYS)],
        )
        rows = cursor.fetchall()
    found = {table: set() for table in EXPECTED_FOREIGN_KEYS}
    for table, column, parent, deferrable, deferred in rows:
        found[table].add((column, parent))
        assert deferrable and deferred, (table, column)  # Django's: checked once, at COMMIT
    assert found == EXPECTED_FOREIGN_KEYS


def _track_and_batch(tenant):
    """Usage written by every ingest form: a single track (mapped by featureId), a batch
    (a rule and a featureId), and a batch large enough to take the COPY route."""
    feature(tenant, "exports")
    rule(tenant, "exports", "Exported")
    segment = SegmentClient(tenant)
    assert segment.track("u1", "Sent", {"featureId": "exports"}, messageId=f"{tenant.key}-1").status_code == 200
    batch = [
        {"type": "track", "userId": f"u{i % 3}", "event": "Exported", "messageId": f"{tenant.key}-b{i}"}
        for i in range(12)
    ]
    batch.append({"type": "track", "userId": "u2", "event": "Sent", "properties": {"featureId": "exports"}})
    assert segment.batch(batch).status_code == 200


def test_a_usage_rows_workspace_is_its_events():
    first, second = make_tenant("First"), make_tenant("Second")
    _track_and_batch(first)
    _track_and_batch(second)

    assert Usage.objects.count() == 2 * 14
    assert not Usage.objects.exclude(workspace_id=F("event__workspace_id")).exists()
    assert not Usage.objects.exclude(workspace_id=F("feature__workspace_id")).exists()
    assert not Usage.objects.filter(rule__isnull=False).exclude(workspace_id=F("rule__workspace_id")).exists()


@pytest.mark.usefixtures("tasks_in_process")
def test_a_reprocessed_usage_rows_workspace_is_its_events(django_capture_on_commit_callbacks):
    tenant, other = make_tenant("First"), make_tenant("Second")
    for each in (tenant, other):
        SegmentClient(each).track("u1", "Exported", messageId=f"{each.key}-m")
        assert Event.objects.get(message_id=f"{each.key}-m").status == EventStatus.UNMAPPED
        feature(each, "exports")
        with django_capture_on_commit_callbacks(execute=True):
            rule(each, "exports", "Exported")  # its job maps the stored event

    assert Usage.objects.count() == 2
    assert not Usage.objects.exclude(workspace_id=F("event__workspace_id")).exists()


def test_a_workspace_with_usage_is_protected_and_one_without_deletes_its_events():
    """Django's PROTECT on the usage's feature (and the rules') refuses the deletion of a
    workspace with usage, as before the constraint went; a workspace with only events loses
    them with it."""
    used, plain, kept = make_tenant("Used"), make_tenant("Plain"), make_tenant("Kept")
    _track_and_batch(used)
    _track_and_batch(kept)
    SegmentClient(plain).track("u1", "Sent", messageId="plain-1")

    with pytest.raises(ProtectedError), transaction.atomic():
        Workspace.objects.filter(pk=used.workspace.pk).delete()
    assert Usage.objects.filter(workspace=used.workspace).count() == 14
    assert UsageCounter.objects.filter(workspace_id=used.workspace.pk).exists()

    Workspace.objects.filter(pk=plain.workspace.pk).delete()
    assert not Event.objects.filter(workspace_id=plain.workspace.pk).exists()
    assert Usage.objects.filter(workspace=kept.workspace).count() == 14
    assert Event.objects.filter(workspace=kept.workspace).count() == 14


def test_a_feature_with_usage_is_protected(tenant):
    exports = feature(tenant, "exports")
    SegmentClient(tenant).track("u1", "Sent", {"featureId": "exports"})

    with pytest.raises(FeatureError) as refused:
        feature_delete(workspace=tenant.workspace, feature=exports)
    assert refused.value.code == "feature_in_use"
    with pytest.raises(ProtectedError), transaction.atomic():
        Feature.objects.filter(pk=exports.pk).delete()  # Django's PROTECT, not the database's
    assert Usage.objects.get().feature_id == exports.pk


def test_deleting_a_rule_through_the_orm_keeps_its_usage_without_the_rule(tenant):
    feature(tenant, "exports")
    used = rule(tenant, "exports", "Exported")
    SegmentClient(tenant).track("u1", "Exported")
    assert Usage.objects.get().rule_id == used.pk

    MappingRule.objects.filter(pk=used.pk).delete()  # rule_delete refuses; Django's SET_NULL here

    usage = Usage.objects.get()
    assert usage.rule_id is None
    assert usage.amount == 1


@requires_postgres
@pytest.mark.postgres
def test_a_feature_that_gets_usage_while_it_is_being_deleted_is_not_deleted(transactional_db, tenant):
    """Without the constraint, the rules lock is what keeps a deleted feature from being
    referenced: usage mapped by featureId (no rule to refuse on) commits while
    ``feature_delete`` waits for the lock, and the delete then sees it."""
    SegmentClient(tenant).track("u1", "Sent", messageId="m-1")
    exports = feature(tenant, "exports")
    event = Event.objects.get(message_id="m-1")
    mapping, release = threading.Event(), threading.Event()

    def map_by_feature_id():  # an ingest or reprocessing transaction, held open
        try:
            with transaction.atomic():
                lock_rules_shared(tenant.workspace.pk)
                ledger.map_events(tenant.workspace.pk, [event.pk], [(event.pk, exports.pk, None, Decimal(1))])
                mapping.set()
                assert release.wait(timeout=30)
        finally:
            connections.close_all()

    def delete_the_feature():
        try:
            feature_delete(workspace=tenant.workspace, feature=exports)
            return None
        except FeatureError as error:
            return error.code
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        chunk = pool.submit(map_by_feature_id)
        assert mapping.wait(timeout=30)
        deleting = pool.submit(delete_the_feature)
        time.sleep(1)  # the delete now waits for the shared lock
        assert not deleting.done()
        release.set()
        chunk.result(timeout=30)
        outcome = deleting.result(timeout=30)

    assert outcome == "feature_in_use"
    assert Feature.objects.filter(pk=exports.pk).exists()
    assert Usage.objects.get(event=event).feature_id == exports.pk


# The usage's rule index is partial (migration features/0011): usage mapped by featureId has no
# rule and writes no entry into it (one index insert less for such a track), and every read of
# it looks a rule up, which the partial index still serves.
@requires_postgres
def test_the_rule_index_leaves_out_usage_without_a_rule_and_serves_the_rule_s_lookups(tenant):
    feature(tenant, "exports")
    used = rule(tenant, "exports", "Exported")
    client = SegmentClient(tenant)
    client.track("u1", "Exported")
    client.track("u1", "Sent", {"featureId": "exports"})
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_get_expr(i.indpred, i.indrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = 'features_usage'::regclass AND 'rule_id' = ALL (SELECT attname FROM pg_attribute"
            " WHERE attrelid = i.indrelid AND attnum = ANY (i.indkey))"
        )
        assert cursor.fetchall() == [("(rule_id IS NOT NULL)",)]
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN UPDATE features_usage SET rule_id = NULL WHERE rule_id IN (%s)", [used.pk])
        set_null_plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "usage_rule_idx" in Usage.objects.filter(rule=used).explain()  # rule_is_used
    assert "usage_rule_idx" in set_null_plan  # Django's SET_NULL on the rule's deletion
    assert Usage.objects.filter(rule=used).count() == 1
    assert Usage.objects.filter(rule__isnull=True).count() == 1
