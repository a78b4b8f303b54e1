"""Batches of usage messages: on PostgreSQL, runs of ``JSON_ROWS_MIN_EVENTS`` or more are
written from JSON documents (they were COPYed into staging tables before round 8), shorter
ones with rendered INSERT values.

The two paths must store the same rows, and the bulk one must be as safe under concurrent
duplicates as INSERT: its insert skips what a concurrent request stored.
"""

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connections, transaction

from features.ledger import JSON_ROWS_MIN_EVENTS, _text_array, record_usage_events
from features.mapping import Decision
from features.models import Event, Usage
from features.services import RuleDefinition, feature_create, rule_create
from segment_ingest.messages import parse_message
from users.models import EndUser

from .conftest import requires_postgres
from .test_identify_concurrency import assert_all_ok, in_parallel

# What text COPY had to escape, and JSON must: backslashes, tabs, newlines, carriage returns,
# "\N", quotes, non-ASCII.
AWKWARD = 'tab\there\nline\r\\N back\\slash é 🎉 "quoted"'


def setup_rules(workspace):
    feature_create(workspace=workspace, key="exports")
    feature_create(workspace=workspace, key="seats")
    rule = rule_create(
        workspace=workspace,
        definition=RuleDefinition(
            name="Pro exports",
            feature_key="exports",
            event_name="Report Exported",
            conditions=[{"property": "plan.tier", "operator": "equals", "value": "pro"}],
            amount_property="pages",
        ),
    )
    return rule


def messages(prefix: str, count: int) -> list[dict]:
    shapes = [
        ("Report Exported", {"plan": {"tier": "pro"}, "pages": 3, "note": AWKWARD}),  # mapped by the rule
        ("Report Exported", {"plan": {"tier": "free"}}),  # no matching rule
        ("Seat Added", {"featureId": "seats", "delta": 2.5}),  # featureId
        ("Seat Added", {"featureId": "nope"}),  # unknown feature
        ("Report Exported", {"plan": {"tier": "pro"}, "pages": "many"}),  # invalid amount
    ]
    return [
        {
            "type": "track",
            "userId": f"{prefix}-user-{i % 3}",
            "messageId": f"{prefix}-{i}",
            "event": shapes[i % len(shapes)][0],
            "properties": shapes[i % len(shapes)][1],
            "timestamp": f"2026-01-15T10:{i // 60:02d}:{i % 60:02d}Z",
        }
        for i in range(count)
    ]


def stored(prefix: str) -> list[tuple]:
    rows = []
    for event in Event.objects.filter(message_id__startswith=f"{prefix}-").order_by("occurred_at"):
        payload = dict(event.payload)
        payload["messageId"] = payload["messageId"].removeprefix(prefix)
        payload["userId"] = payload["userId"].removeprefix(prefix)
        usage = sorted(
            (u.feature.key, u.amount, u.rule_id, u.occurred_at, u.user_id == event.user_id)
            for u in Usage.objects.filter(event=event)
        )
        rows.append(
            (
                event.type,
                event.name,
                event.external_user_id.removeprefix(prefix),
                event.user.user_id.removeprefix(prefix),
                payload,
                event.occurred_at,
                event.status,
                event.unmapped_reason,
                event.warnings,
                usage,
            )
        )
    return rows


def test_a_large_batch_stores_the_same_rows_as_single_messages(segment, tenant):
    rule = setup_rules(tenant.workspace)
    count = max(JSON_ROWS_MIN_EVENTS, 10)
    for message in messages("single", count):
        assert segment.post("/v1/track", message).status_code == 200
    response = segment.batch(messages("batch", count), context={"library": {"name": "analytics-python"}})
    assert response.status_code == 200 and response.json()["accepted"] == count

    singles, batched = stored("single"), stored("batch")
    assert len(batched) == count
    # The batch context is the only difference in the payloads.
    for row in batched:
        assert row[4].pop("context") == {"library": {"name": "analytics-python"}}
    assert batched == singles

    first = batched[0]
    assert first[4]["properties"]["note"] == AWKWARD
    assert first[5] == datetime(2026, 1, 15, 10, 0, 0, tzinfo=UTC)
    assert (first[6], first[7]) == ("mapped", "")
    assert first[9] == [("exports", Decimal(3), rule.pk, first[5], True)]
    assert [(row[6], row[7]) for row in batched[:5]] == [
        ("mapped", ""),
        ("unmapped", "no_matching_rule"),
        ("mapped", ""),
        ("unmapped", "unknown_feature"),
        ("unmapped", "invalid_delta"),
    ]
    assert batched[2][9] == [("seats", Decimal("2.5"), None, batched[2][5], True)]
    assert EndUser.objects.filter(user_id__startswith="batch-").count() == 3


def test_a_large_batch_keeps_awkward_ids_names_times_and_amounts_exactly(segment, tenant):
    # Every text field of the bulk path's JSON rows, and its times and amounts, as a single
    # message stores them (the single track renders its values as SQL instead).
    setup_rules(tenant.workspace)
    count = max(JSON_ROWS_MIN_EVENTS, 10)

    def awkward(prefix: str) -> list[dict]:
        return [
            {
                "type": "track",
                "userId": f'{prefix}-u "{i % 2}" \\ é🎉',
                "messageId": f'{prefix}-{i}-"q"\\\t🎉',
                "event": "Seat Added" if i % 2 else f'Report "{i}" \\N\ttab é🎉',
                "properties": {"featureId": "seats", "delta": ["1E+2", "0.000001", "3"][i % 3]}
                if i % 2
                else {"plan": {"tier": "pro"}},
                "timestamp": ["0099-03-01T23:59:59.123456+05:30", "2026-01-15T10:00:00.5Z", "9999-12-31T23:59:59Z"][
                    i % 3
                ],
            }
            for i in range(count)
        ]

    for message in awkward("one"):
        assert segment.post("/v1/track", message).json()["success"] is True
    assert segment.batch(awkward("many")).json()["accepted"] == count

    def rows(prefix: str) -> list[tuple]:
        found = []
        for event in Event.objects.filter(message_id__startswith=f"{prefix}-").order_by("id"):
            usage = [(u.feature.key, u.amount, u.occurred_at) for u in Usage.objects.filter(event=event)]
            found.append(
                (
                    event.message_id.removeprefix(prefix),
                    event.name,
                    event.external_user_id.removeprefix(prefix),
                    event.payload["userId"].removeprefix(prefix),
                    event.occurred_at,
                    event.status,
                    event.unmapped_reason,
                    usage,
                )
            )
        return sorted(found)

    singles, batched = rows("one"), rows("many")
    assert len(batched) == count and batched == singles
    # The replay read finds them by their awkward messageIds (its arrays are literals).
    assert segment.batch(awkward("many")).json()["duplicates"] == count
    assert {row[2] for row in batched} == {'-u "0" \\ é🎉', '-u "1" \\ é🎉'}
    assert sorted({row[-1][0][1] for row in batched if row[-1] and row[-1][0][0] == "seats"}) == [
        Decimal("0.000001"),
        Decimal("3"),
        Decimal("100"),
    ]


def test_a_replayed_large_batch_changes_nothing(segment, tenant):
    setup_rules(tenant.workspace)
    batch = messages("again", 20)
    assert segment.batch(batch).json()["accepted"] == 20
    usage = Usage.objects.count()

    body = segment.batch(batch).json()

    assert (body["accepted"], body["duplicates"]) == (0, 20)
    assert Event.objects.filter(message_id__startswith="again-").count() == 20
    assert Usage.objects.count() == usage


@requires_postgres
@pytest.mark.postgres
@pytest.mark.parametrize("users", ["new", "known"])
def test_parallel_copies_of_one_batch_store_each_message_once(transactional_db, tenant, segment, users):
    setup_rules(tenant.workspace)
    if users == "known":
        assert segment.batch(messages("race", 3)[:3]).status_code == 200  # creates the three users
    batch = messages("race", 100)[3:] if users == "known" else messages("race", 100)

    results = in_parallel(tenant, [lambda c: c.batch(batch)] * 4)

    assert_all_ok(results)
    bodies = [json.loads(content) for _, content in results]
    assert all(b["rejected"] == [] for b in bodies)
    assert sum(b["accepted"] for b in bodies) == len(batch)  # each stored by exactly one request
    assert sum(b["duplicates"] for b in bodies) == len(batch) * 3
    assert Event.objects.filter(message_id__startswith="race-").count() == 100
    mapped = Event.objects.filter(message_id__startswith="race-", status="mapped").count()
    assert Usage.objects.count() == mapped == 40
    assert EndUser.objects.count() == 3


@requires_postgres
@pytest.mark.postgres
def test_a_copy_colliding_with_an_uncommitted_insert_skips_them_without_a_retry(transactional_db, tenant, caplog):
    """Deterministic version of the race: the batch's replay check cannot see rows another
    transaction has not committed, so its insert waits on the unique index; when they commit
    it skips them (ON CONFLICT DO NOTHING) and answers duplicates: no retry, no 500."""
    setup_rules(tenant.workspace)
    batch = messages("held", 20)
    caplog.set_level(logging.INFO, logger="kana.retries")
    inserted, release = threading.Event(), threading.Event()

    def hold_rows():  # another connection, its transaction open until released
        try:
            now = datetime.now(UTC)
            with transaction.atomic():
                Event.objects.bulk_create(
                    Event(
                        workspace=tenant.workspace,
                        message_id=m["messageId"],
                        type="track",
                        payload=m,
                        occurred_at=now,
                        received_at=now,
                        status="unmapped",
                    )
                    for m in batch
                )
                inserted.set()
                assert release.wait(timeout=30)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        holder = pool.submit(hold_rows)
        assert inserted.wait(timeout=30)
        pending = pool.submit(in_parallel, tenant, [lambda c: c.batch(batch)])
        time.sleep(1)  # the batch's insert now waits on the uncommitted rows
        assert not pending.done()
        release.set()
        holder.result(timeout=30)
        [(status, content)] = pending.result(timeout=30)

    assert status == 200, content
    assert (json.loads(content)["accepted"], json.loads(content)["duplicates"]) == (0, 20)
    assert Event.objects.filter(message_id__startswith="held-").count() == 20
    assert Usage.objects.count() == 0
    assert not [r for r in caplog.records if r.name == "kana.retries"]


def test_a_generated_message_id_is_in_the_stored_payload(segment, tenant):
    batch = [{"type": "track", "userId": "anon-id", "event": "Clicked", "properties": {"n": i}} for i in range(10)]

    assert segment.batch(batch).json()["accepted"] == 10

    events = Event.objects.filter(external_user_id="anon-id")
    assert len(events) == 10
    for event in events:
        assert event.message_id.startswith("kana-") and event.payload["messageId"] == event.message_id


@requires_postgres
@pytest.mark.postgres
def test_the_replay_read_s_array_literal_keeps_every_value_as_sent(db):
    values = {
        "",
        "NULL",
        "plain",
        'q"uote',
        "back\\slash",
        "\\",
        '\\"',
        "{brace}",
        "a,b",
        " spaced ",
        "é🎉",
        "tab\tnl\n",
    }
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT unnest(%s::text[])", [_text_array(values)])
        assert {value for (value,) in cursor.fetchall()} == values


@pytest.mark.parametrize("count", [2, JSON_ROWS_MIN_EVENTS, 100])
def test_a_run_repeating_a_message_id_is_stored_as_its_first_copy(tenant, count):
    """``ledger.record_usage_events`` stores one row per messageId, its first copy's: event and
    usage alike (the usage insert relies on it: it has no ``ON CONFLICT`` to skip a second
    (event, feature)). Before, both copies' usage rows joined the one event stored, which
    could be the other copy's: an unmapped event with usage."""
    feature = feature_create(workspace=tenant.workspace, key="exports")
    user = EndUser.objects.create(workspace=tenant.workspace, user_id="dup-user")
    received = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)

    def message(message_id: str, name: str):
        payload = {"type": "track", "userId": "dup-user", "event": name, "messageId": message_id}
        return parse_message(payload, received_at=received)

    unmapped = Decision("unmapped", "no_matching_rule")
    mapped = Decision("mapped", usages=[(feature.pk, Decimal("2"), None)])
    decided = [(message("twice", "First Copy"), unmapped, user.pk), (message("twice", "Second Copy"), mapped, user.pk)]
    decided += [(message(f"other-{n}", "Other"), mapped, user.pk) for n in range(count - 2)]
    with transaction.atomic():
        stored = record_usage_events(tenant.workspace, decided)
    assert stored == {"twice", *(f"other-{n}" for n in range(count - 2))}
    event = Event.objects.get(workspace=tenant.workspace, message_id="twice")
    assert (event.name, event.status) == ("First Copy", "unmapped")
    assert not Usage.objects.filter(event=event).exists()
    assert Usage.objects.filter(workspace=tenant.workspace).count() == count - 2


@pytest.mark.parametrize("count", [2, JSON_ROWS_MIN_EVENTS])
def test_a_batch_maps_with_the_rules_of_the_version_it_read(segment, tenant, count):
    """Each batch reads the rules version in its first round trip (with its replay read) and
    maps with the rules of that version: a rule created between two batches maps the second,
    at the default amount of 1 when the event has no delta."""
    feature_create(workspace=tenant.workspace, key="exports")

    def batch(prefix: str) -> list[dict]:
        return [
            {"type": "track", "userId": f"v-user-{i % 2}", "messageId": f"{prefix}-{i}", "event": "Report Exported"}
            for i in range(count)
        ]

    assert segment.batch(batch("before")).json()["accepted"] == count
    rule = rule_create(
        workspace=tenant.workspace,
        definition=RuleDefinition(name="Exports", feature_key="exports", event_name="Report Exported"),
    )
    assert segment.batch(batch("after")).json()["accepted"] == count
    after = Event.objects.filter(message_id__startswith="after-")
    assert sorted(after.values_list("status", flat=True)) == ["mapped"] * count
    assert (
        sorted(Usage.objects.filter(event__in=after).values_list("amount", "rule_id"))
        == [(Decimal(1), rule.pk)] * count
    )
    # (The first batch's events are the rule's reprocessing's to map, after it commits.)
