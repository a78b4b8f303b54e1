"""A single track of a known user in one round trip (``features.ingest._record_known_user_usage``).

The message is decided with the rules this process holds, and one statement, run after the
shared rules lock in the same implicit transaction, stores it only if the userId has a user,
is not suppressed, and the workspace's rules are still at the version it was decided with.
Anything else stores nothing there and goes the usual way: these tests hold that the answers
and the rows are the usual path's, whatever the process's rules cache holds, and that a rule
created while other processes send tracks counts every event exactly once.
"""

import multiprocessing

import pytest
from django.db import connection, connections

from features import ingest, ledger, mapping
from features.models import Event, EventStatus, Feature, ReprocessingJob, UnmappedReason, Usage
from features.services import feature_update
from kana.db import kept_cursor, pipelined
from kana.locks import lock_rules_shared_then_run
from users.services import delete_user

from .conftest import SegmentClient, requires_postgres, wait_until
from .usage_support import make_feature, make_rule, make_user, store_unmapped_events, usage_count

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]

PRO = [{"property": "plan.tier", "operator": "equals", "value": "pro"}]


def _recording(answers: list):
    """``ledger.record_known_user_usage`` that also appends each of its answers to ``answers``."""
    original = ledger.record_known_user_usage

    def recorded(*args, **kwargs):
        answer = original(*args, **kwargs)
        answers.append(answer)
        return answer

    return recorded


@pytest.fixture
def one_round_trips(monkeypatch):
    """What ``ledger.record_known_user_usage`` answered, in this process: stored / not."""
    answers = []
    monkeypatch.setattr(ledger, "record_known_user_usage", _recording(answers))
    return answers


def _archive(tenant, key: str) -> None:
    feature = Feature.objects.get(workspace=tenant.workspace, key=key)
    feature_update(workspace=tenant.workspace, feature=feature, archived=True)


@pytest.fixture
def workspace_rules(tenant):
    make_feature(tenant.workspace, "reports")
    make_feature(tenant.workspace, "seats")
    make_feature(tenant.workspace, "retired")
    make_rule(tenant.workspace, "reports", event="Report Exported", conditions=PRO, name="pro exports")
    make_rule(tenant.workspace, "seats", event="Report Exported", amount_property="pages", name="pages")
    feature_update(
        workspace=tenant.workspace,
        feature=Feature.objects.get(workspace=tenant.workspace, key="retired"),
        archived=True,
    )
    return tenant


MESSAGES = {
    "feature id": ("Anything", {"featureId": "reports", "delta": 3}),
    "feature id, unknown": ("Anything", {"featureId": "nope"}),
    "feature id, archived": ("Anything", {"featureId": "retired"}),
    "feature id, invalid amount": ("Anything", {"featureId": "reports", "delta": "many"}),
    "two rules": ("Report Exported", {"plan": {"tier": "pro"}, "pages": 12}),
    "one rule": ("Report Exported", {"plan": {"tier": "free"}, "pages": 2}),
    "one rule, invalid amount": ("Report Exported", {"plan": {"tier": "pro"}, "pages": "x"}),
    "no rule": ("Logged In", {"plan": {"tier": "pro"}}),
}


def _stored(workspace, message_id: str) -> tuple:
    event = Event.objects.get(workspace=workspace, message_id=message_id)
    usage = sorted(Usage.objects.filter(event=event).values_list("feature__key", "amount", "rule__name", "user_id"))
    return (
        event.status,
        event.unmapped_reason,
        event.type,
        event.name,
        event.user_id,
        event.external_user_id,
        {k: v for k, v in event.payload.items() if k != "messageId"},
        event.warnings,
        usage,
    )


@pytest.mark.parametrize("message", list(MESSAGES))
def test_a_known_user_s_track_stores_and_answers_what_the_usual_path_does(
    workspace_rules, one_round_trips, monkeypatch, message
):
    tenant = workspace_rules
    segment = SegmentClient(tenant)
    assert segment.track("known", "Warm Up").status_code == 200  # creates the user, loads the rules
    event, properties = MESSAGES[message]
    sent = {"timestamp": "2026-11-30T10:00:00Z", "context": {"ip": "10.0.0.1"}}

    one_round_trips.clear()
    fast = segment.track("known", event, properties, messageId="fast", **sent)
    assert [answer.stored for answer in one_round_trips] == [True]

    monkeypatch.setattr(ingest, "cached_rule_set", lambda workspace_id: None)  # the usual path only
    one_round_trips.clear()
    usual = segment.track("known", event, properties, messageId="usual", **sent)
    assert one_round_trips == []

    assert fast.status_code == usual.status_code == 200
    assert {**fast.json(), "message_id": None} == {**usual.json(), "message_id": None}
    assert _stored(tenant.workspace, "fast") == _stored(tenant.workspace, "usual")


def test_a_replay_is_a_duplicate_and_stores_nothing(workspace_rules, one_round_trips):
    segment = SegmentClient(workspace_rules)
    assert segment.track("known", "Warm Up").status_code == 200
    body = {"featureId": "reports", "delta": 2}
    assert segment.track("known", "Used", body, messageId="once").json()["status"] == "mapped"
    assert segment.track("known", "Used", body, messageId="once").json()["status"] == "duplicate"
    assert [(a.user_pk is not None, a.stored) for a in one_round_trips[-2:]] == [(True, True), (True, False)]
    assert Event.objects.filter(message_id="once").count() == 1
    assert usage_count(workspace_rules.workspace, "reports") == 1


def test_a_process_whose_rules_are_stale_decides_with_the_current_ones(workspace_rules, one_round_trips):
    """Another process's cache, as this one's is when a rule is created elsewhere: the statement
    finds the version moved, stores nothing, and the usual path maps with the new rule."""
    tenant = workspace_rules
    segment = SegmentClient(tenant)
    assert segment.track("known", "Warm Up").status_code == 200
    stale = mapping.cached_rule_set(tenant.workspace.pk)
    make_feature(tenant.workspace, "logins")
    make_rule(tenant.workspace, "logins", event="Logged In")
    feature_update(
        workspace=tenant.workspace,
        feature=Feature.objects.get(workspace=tenant.workspace, key="reports"),
        archived=True,
    )

    for message_id, event, properties, status, reason in [
        ("after-rule", "Logged In", {}, EventStatus.MAPPED, ""),
        ("after-archive", "Used", {"featureId": "reports"}, EventStatus.UNMAPPED, UnmappedReason.FEATURE_ARCHIVED),
    ]:
        mapping._cache[tenant.workspace.pk] = stale
        one_round_trips.clear()
        answer = segment.track("known", event, properties, messageId=message_id).json()
        assert (answer["status"], answer.get("reason", "")) == (status, reason), answer
        assert [(a.user_pk, a.stored) for a in one_round_trips] == [(None, False)]  # the version moved
        assert Event.objects.get(message_id=message_id).status == status
    assert usage_count(tenant.workspace, "logins") == 1
    assert usage_count(tenant.workspace, "reports") == 0


def test_a_deleted_user_s_user_id_is_answered_suppressed(workspace_rules, one_round_trips):
    segment = SegmentClient(workspace_rules)
    assert segment.track("gone", "Used", {"featureId": "reports"}).json()["status"] == "mapped"
    assert segment.track("gone", "Used", {"featureId": "reports"}).json()["status"] == "mapped"
    assert one_round_trips[-1].stored
    user = Event.objects.filter(external_user_id="gone").first().user
    delete_user(workspace=workspace_rules.workspace, user_pk=user.pk, events="delete")

    answer = segment.track("gone", "Used", {"featureId": "reports"}, messageId="after-delete").json()
    assert answer["status"] == "suppressed"
    assert (one_round_trips[-1].user_pk, one_round_trips[-1].stored) == (None, False)
    assert not Event.objects.filter(message_id="after-delete").exists()


def test_the_lock_is_held_until_the_statement_s_work_commits_in_one_transaction(tenant):
    """``lock_rules_shared_then_run``: one implicit transaction, committed at the pipeline's
    end; a failing statement rolls it back and releases the lock."""
    assert pipelined.available()
    sql = (
        "SELECT txid_current(), (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND pid = pg_backend_pid() AND objid = %(workspace)s::bigint)"
    )
    ((txid, held),) = lock_rules_shared_then_run(
        tenant.workspace.pk, kept_cursor.Statement(sql, {"workspace": tenant.workspace.pk})
    )
    assert held == 1
    assert not pipelined.in_transaction()
    with connection.cursor() as cursor:
        cursor.execute("SELECT txid_current()")
        assert cursor.fetchone()[0] > txid  # committed: a new transaction
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        assert cursor.fetchone()[0] == 0


# --- A rule created while other processes send tracks -------------------------------------


def _send_tracks(tenant, index: int, stop, counter, results) -> None:
    """A child process (forked with this process's rules cache, at the version before the
    rule): tracks of its user until ``stop``, at least 30; reports what it sent and what the
    one-round-trip statement answered."""
    answers = []
    ledger.record_known_user_usage = _recording(answers)  # this child's own module
    client = SegmentClient(tenant)
    tiers, errors, n = [], [], 0
    try:
        while not stop.is_set() or n < 30:
            tier = "pro" if n % 2 == 0 else "free"
            response = client.track(f"p{index}", "Report Exported", {"plan": {"tier": tier}}, messageId=f"p{index}-{n}")
            if response.status_code != 200:
                errors.append(response.content.decode())
            tiers.append(tier)
            n += 1
            with counter.get_lock():
                counter.value += 1
    except Exception as exc:  # reported to the parent, which fails the test with it
        errors.append(repr(exc))
    finally:
        connections.close_all()
        results.put(
            {
                "tiers": tiers,
                "errors": errors,
                "stored": sum(1 for a in answers if a.stored),
                "missed": sum(1 for a in answers if a.user_pk is None),
            }
        )


@pytest.mark.usefixtures("tasks_in_process")
def test_a_rule_created_while_processes_send_known_users_tracks_counts_each_event_once(tenant):
    user = make_user(tenant.workspace, "u0")
    store_unmapped_events(
        tenant.workspace,
        user,
        [("Report Exported", {"plan": {"tier": "pro" if i % 2 else "free"}}) for i in range(400)],
    )
    make_feature(tenant.workspace, "pro-exports")
    senders = 3
    for index in range(senders):
        make_user(tenant.workspace, f"p{index}")
    # This process's rules cache, at the version before the rule, is what the children start with.
    assert SegmentClient(tenant).track("u0", "Warm Up").status_code == 200
    assert mapping.cached_rule_set(tenant.workspace.pk) is not None

    context = multiprocessing.get_context("fork")
    stop, counter, results = context.Event(), context.Value("i", 0), context.Queue()
    connections.close_all()  # each child opens its own connection
    children = [context.Process(target=_send_tracks, args=(tenant, i, stop, counter, results)) for i in range(senders)]
    for child in children:
        child.start()
    try:
        wait_until(lambda: counter.value >= 10 * senders, timeout=60, message="tracks before the rule")
        rule = make_rule(tenant.workspace, "pro-exports", conditions=PRO)  # its job runs here, at commit
        before = counter.value
        wait_until(lambda: counter.value >= before + 10 * senders, timeout=60, message="tracks after the rule")
    finally:
        stop.set()
        reports = [results.get(timeout=120) for _ in children]
        for child in children:
            child.join(timeout=60)
    assert all(child.exitcode == 0 for child in children)
    assert [r["errors"] for r in reports] == [[]] * senders
    # Each child stored through the one round trip, and found the version moved exactly once:
    # its first track after the rule, which the usual path then mapped with the rule's cache.
    assert all(r["stored"] >= 20 and r["missed"] == 1 for r in reports), reports

    last_event_id = ReprocessingJob.objects.filter(rule=rule).values_list("last_event_id", flat=True).first()
    matching = Event.objects.filter(workspace=tenant.workspace, payload__properties__plan__tier="pro")
    assert matching.count() == 200 + sum(r["tiers"].count("pro") for r in reports)
    # Every matching event counted once: none missed, none twice.
    assert usage_count(tenant.workspace, "pro-exports") == matching.count()
    assert not matching.exclude(status=EventStatus.MAPPED).exists()
    assert Usage.objects.filter(feature__key="pro-exports").values("event").distinct().count() == matching.count()
    assert matching.filter(id__gt=last_event_id).exists()  # stored after the rule: ingest mapped them
