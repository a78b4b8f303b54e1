"""The daily usage counters (features.counters): exact whichever path writes usage (SPEC §11 Speed)."""

from datetime import UTC, date, datetime
from decimal import Decimal

import psycopg
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import Sum

from features.counters import counter_differences, drain_touched_usage, period_used, rebuild_usage_counters
from features.models import Usage, UsageCounter

from .conftest import database_url_for_subprocess, requires_postgres
from .usage_support import make_feature


def counters(workspace) -> dict:
    return {
        (c.user_id, c.feature_id, c.day.isoformat()): Decimal(c.amount)
        for c in UsageCounter.objects.for_workspace(workspace)
        if c.amount
    }


def track(segment, user_id, feature, *, at, delta=1, message_id=None):
    body = {"featureId": feature, "delta": delta}
    fields = {"timestamp": at}
    if message_id:
        fields["messageId"] = message_id
    response = segment.track(user_id, "Used", body, **fields)
    assert response.status_code == 200, response.content


def test_ingest_moves_the_counter_of_the_events_own_day(tenant, segment):
    feature = make_feature(tenant.workspace, "exports")
    track(segment, "u1", "exports", at="2025-01-31T23:59:59Z", delta=2)
    track(segment, "u1", "exports", at="2025-02-01T00:00:00Z", delta=3)
    track(segment, "u1", "exports", at="2025-02-01T10:00:00Z", delta=-1)
    user_pk = Usage.objects.get(amount=2).user_id

    assert counters(tenant.workspace) == {
        (user_pk, feature.pk, "2025-01-31"): 2,
        (user_pk, feature.pk, "2025-02-01"): 2,
    }
    assert counter_differences(tenant.workspace.pk) == []


def test_period_used_reads_whole_days_from_counters_and_boundary_days_from_usage(tenant, segment):
    make_feature(tenant.workspace, "exports")
    for at in (
        "2025-01-10T09:00:00Z",
        "2025-01-10T11:00:00Z",
        "2025-01-11T00:00:00Z",
        "2025-01-12T10:59:59Z",
        "2025-01-12T11:00:00Z",
    ):
        track(segment, "u1", "exports", at=at)
    usage = Usage.objects.first()
    start, end = datetime(2025, 1, 10, 10, tzinfo=UTC), datetime(2025, 1, 12, 11, tzinfo=UTC)

    used = period_used(tenant.workspace.pk, user_pks=[usage.user_id], feature_id=usage.feature_id, start=start, end=end)

    assert used == 3  # 11:00 on the 10th, the 11th, 10:59:59 on the 12th
    assert (
        period_used(tenant.workspace.pk, user_pks=[usage.user_id], feature_id=usage.feature_id, start=start, end=None)
        == 4
    )
    same_day = period_used(
        tenant.workspace.pk,
        user_pks=[usage.user_id],
        feature_id=usage.feature_id,
        start=datetime(2025, 1, 10, 10, tzinfo=UTC),
        end=datetime(2025, 1, 10, 12, tzinfo=UTC),
    )
    assert same_day == 1


def test_rebuild_reports_and_fixes_a_difference(tenant, segment, capsys):
    make_feature(tenant.workspace, "exports")
    track(segment, "u1", "exports", at="2025-01-10T09:00:00Z", delta=5)
    UsageCounter.objects.update(amount=1)  # a counter gone wrong

    assert len(rebuild_usage_counters(tenant.workspace.pk)) == 1
    assert counter_differences() == []
    assert UsageCounter.objects.aggregate(total=Sum("amount"))["total"] == 5


def test_the_command_exits_non_zero_when_it_fixed_a_difference(tenant, segment):
    import io

    import pytest

    make_feature(tenant.workspace, "exports")
    track(segment, "u1", "exports", at="2025-01-10T09:00:00Z", delta=5)
    out = io.StringIO()
    call_command("rebuild_usage_counters", str(tenant.workspace.pk), stdout=out)
    assert "0 difference(s)" in out.getvalue()

    UsageCounter.objects.update(amount=7)
    with pytest.raises(SystemExit) as exit_:
        call_command("rebuild_usage_counters", "Acme", stdout=out)
    assert exit_.value.code == 1 and "counted 7, usage rows 5" in out.getvalue()
    call_command("rebuild_usage_counters", stdout=io.StringIO())


def test_a_batch_stored_through_copy_moves_the_counters_once_per_statement(tenant, segment):
    feature = make_feature(tenant.workspace, "exports")
    messages = [
        {
            "type": "track",
            "userId": f"u{n % 3}",
            "event": "Used",
            "messageId": f"b-{n}",
            "timestamp": f"2025-01-{10 + n % 4}T12:00:00Z",
            "properties": {"featureId": "exports", "delta": n},
        }
        for n in range(20)  # past the ledger's COPY threshold on PostgreSQL
    ]
    assert segment.batch(messages).status_code == 200
    assert segment.batch(messages).status_code == 200  # a replay changes nothing

    assert counter_differences(tenant.workspace.pk) == []
    assert sum(counters(tenant.workspace).values()) == sum(range(20))
    assert {key[1] for key in counters(tenant.workspace)} == {feature.pk}


def test_the_counters_triggers_survive_every_migration(db):
    """A later migration that rebuilds ``features_usage`` (SQLite remakes a table to alter a
    column) would drop the triggers silently; the counters would then stop moving."""
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'features_usage'::regclass AND NOT tgisinternal"
            )
        else:
            cursor.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'features_usage'")
        names = {row[0] for row in cursor.fetchall()}
    assert names == {f"features_usage_counter_{operation}" for operation in ("insert", "update", "delete")}


@requires_postgres
def test_keys_written_again_update_their_counter_in_place_and_leave_their_touch_row(tenant, segment):
    """Every statement that writes usage upserts the counter and touch row of each key it
    touched; a reprocessing chunk does thousands in one transaction. The counters' pages keep
    room for a second version of each row (migration 0009), so their updates are HOT: no new
    index entry, no row moved to another page (with full pages, none of these 200 was). A
    touch row that exists is locked, not rewritten (S4 in docs/performance-history.md, "Round 10:
    s4par")."""
    make_feature(tenant.workspace, "exports")

    def batches(round_):
        # 200 keys: more rows than one full page holds, in two statements of 100.
        for first in (0, 100):
            messages = [
                {
                    "type": "track",
                    "userId": f"u{n}",
                    "event": "Used",
                    "messageId": f"r{round_}-{n}",
                    "timestamp": "2025-01-10T12:00:00Z",
                    "properties": {"featureId": "exports"},
                }
                for n in range(first, first + 100)
            ]
            assert segment.batch(messages).status_code == 200

    def writes(table):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_stat_get_xact_tuples_updated(%s::regclass),"
                " pg_stat_get_xact_tuples_hot_updated(%s::regclass), (SELECT count(*) FROM " + table + ")",
                [table, table],
            )
            return cursor.fetchone()

    batches(1)
    counters_before, touches_before = writes("features_usagecounter"), writes("features_usagetouch")
    batches(2)
    (updated, hot, rows), touches = writes("features_usagecounter"), writes("features_usagetouch")
    assert (updated - counters_before[0], rows) == (200, 200)
    assert hot - counters_before[1] >= 190, f"{hot - counters_before[1]} of 200 counter updates in place"
    assert touches == touches_before == (0, 0, 200)
    assert counter_differences(tenant.workspace.pk) == []
    assert set(counters(tenant.workspace).values()) == {2}


@requires_postgres
def test_the_drain_does_not_take_a_touched_key_whose_usage_is_not_committed(transactional_db, tenant, segment):
    """The touch row of a key touched before is locked by the next writer of usage on it
    until that writer commits (migration 0009 locks it instead of bumping ``touches``): the
    drain skips it meanwhile, and takes it once the usage is visible."""
    feature = make_feature(tenant.workspace, "exports")
    track(segment, "u1", "exports", at="2025-01-10T12:00:00Z")
    usage = Usage.objects.get(workspace=tenant.workspace)
    key = (tenant.workspace.pk, usage.user_id, feature.pk, date(2025, 1, 10))
    assert drain_touched_usage() == [key]
    track(segment, "u1", "exports", at="2025-01-10T13:00:00Z")  # the key's touch row exists again

    with psycopg.connect(database_url_for_subprocess().replace("postgres://", "postgresql://")) as writer:
        writer.execute("UPDATE features_usage SET amount = amount + 1 WHERE id = %s", [usage.pk])
        with transaction.atomic():
            assert drain_touched_usage() == []  # the writer holds it: its usage is not visible yet
        writer.commit()
    with transaction.atomic():
        assert drain_touched_usage() == [key]
    assert counter_differences(tenant.workspace.pk) == []
