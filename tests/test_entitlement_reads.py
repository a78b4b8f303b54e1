"""The check's two-statement path and the consume's pipelined one (``entitlements.reads``)
decide exactly as the ORM path, in the round trips they promise."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from entitlements import access, reads
from features.models import FeatureType, Usage
from kana.db import pipelined

from .api_support import ApiClient, feature, identify, track
from .conftest import requires_postgres
from .entitlement_support import check, consume, join_group, package, subscribe

pytestmark = [requires_postgres, pytest.mark.usefixtures("api_route")]


def _hold(tenant, user_id, key, amount, ttl=600):
    body = {"user_id": user_id, "feature": "messages", "amount": amount, "ttl_seconds": ttl, "idempotency_key": key}
    response = ApiClient(tenant).post("entitlements/reservations", body)
    assert response.status_code == 201, response.content


def _shape(entitlement: access.Entitlement) -> dict:
    return {
        **entitlement.as_dict(),
        "owner": entitlement.owner,
        "members": sorted(entitlement.owner_user_pks),
        "feature": entitlement.feature.pk if entitlement.feature else None,
        "reset_period": entitlement.reset_period,
        "anchor": entitlement.anchor,
    }


@pytest.fixture
def corpus(tenant):
    """Subjects covering every reason, own and group budgets, every reset period, partial
    boundary days (anchors off midnight) with usage on both sides, held and expired holds."""
    now = datetime.now(UTC)
    feature(tenant, "messages")
    feature(tenant, "exports")
    feature(tenant, "sso", type=FeatureType.BINARY)
    package(tenant, "monthly", {"feature": "messages", "limit": 30}, {"feature": "sso"})
    package(tenant, "team", {"feature": "messages", "limit": 20, "reset_period": "week"})
    package(tenant, "small", {"feature": "messages", "limit": 5})
    package(tenant, "forever", {"feature": "messages", "limit": None, "reset_period": "never"})
    package(tenant, "daily", {"feature": "messages", "limit": 3, "overage_enabled": True, "reset_period": "day"})
    package(tenant, "daily-midnight", {"feature": "messages", "limit": 4, "reset_period": "day"})

    for user_id in ("u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"):
        identify(tenant, user_id)
    # u1: its own monthly budget anchored at 13:17 forty days ago, a smaller group budget.
    monthly_anchor = now - timedelta(days=40, hours=3, minutes=17)
    subscribe(tenant, "monthly", user_id="u1", started_at=monthly_anchor.isoformat())
    join_group(tenant, "u1", "acme")
    subscribe(tenant, "small", group_id="acme")
    # u2 and u3 share team's weekly budget; u2 also belongs to acme.
    join_group(tenant, "u2", "team")
    join_group(tenant, "u3", "team")
    join_group(tenant, "u2", "acme")
    subscribe(tenant, "team", group_id="team", started_at=(now - timedelta(days=10, hours=5)).isoformat())
    subscribe(tenant, "forever", user_id="u4", started_at=(now - timedelta(days=400)).isoformat())
    subscribe(tenant, "monthly", user_id="u5", status="past_due")
    subscribe(tenant, "daily", user_id="u7", started_at=(now - timedelta(days=2, minutes=30)).isoformat())
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=5)
    subscribe(tenant, "daily-midnight", user_id="u8", started_at=midnight.isoformat())

    # Usage on both sides of every boundary day, and today.
    from entitlements.periods import period_containing

    start, _ = period_containing(monthly_anchor, "month", now)
    week_start, _ = period_containing(now - timedelta(days=10, hours=5), "week", now)
    for user_id, moments in {
        "u1": [start - timedelta(minutes=5), start + timedelta(minutes=5), start + timedelta(hours=12), now],
        "u2": [week_start - timedelta(hours=1), week_start + timedelta(minutes=1), now - timedelta(days=2)],
        "u3": [week_start + timedelta(days=1, hours=2), now - timedelta(seconds=5)],
        "u4": [now - timedelta(days=399), now - timedelta(days=2)],
        "u7": [now - timedelta(minutes=31), now - timedelta(minutes=29), now - timedelta(minutes=1)],
        "u8": [midnight + timedelta(days=5, seconds=1), now - timedelta(days=1)],
    }.items():
        for n, moment in enumerate(moments):
            track(tenant, user_id, "Sent", featureId="messages", delta=n + 1, _at=moment.isoformat())
    _hold(tenant, "u1", "h-u1", 2)
    _hold(tenant, "u2", "h-u2", 1.5)
    _hold(tenant, "u4", "h-u4-short", 1, ttl=1)
    return tenant


QUESTIONS = [
    *[("messages", {"user_id": f"u{n}"}) for n in range(1, 10)],
    ("messages", {"group_id": "team"}),
    ("messages", {"group_id": "acme"}),
    ("messages", {"group_id": "nobody"}),
    ("messages", {}),
    ("messages", {"user_id": "u2", "group_id": "acme"}),
    ("sso", {"user_id": "u1"}),
    ("sso", {"user_id": "u2"}),
    ("exports", {"user_id": "u1"}),
    ("missing", {"user_id": "u1"}),
]


@pytest.mark.parametrize("delta", [Decimal(0), Decimal(1), Decimal("7.5")])
def test_it_decides_as_the_orm_path_for_every_subject(corpus, delta):
    workspace = corpus.workspace
    for now in (timezone.now(), timezone.now() + timedelta(seconds=5)):  # the short hold expired: freed
        for feature_key, subject in QUESTIONS:
            question = {"feature_key": feature_key, "user_id": None, "group_id": None, **subject, "delta": delta}
            fast = access._check_in_two_statements(workspace, **question, now=now)
            orm = access._check_with_orm(workspace, **question, now=now)
            assert _shape(fast) == _shape(orm), (feature_key, subject)


def test_a_consumable_check_is_two_round_trips_and_an_unknown_user_one(corpus, django_assert_num_queries):
    api = ApiClient(corpus)
    # Caches the API key and prepares the statements' shapes on this connection (once each).
    for subject in ({"user_id": "u1"}, {"group_id": "team"}):
        api.get("entitlements/check", {"feature": "messages", **subject})
    with django_assert_num_queries(2):
        answer = api.get("entitlements/check", {"feature": "messages", "user_id": "u1"}).json()
    assert answer["reason"] == "within_limit" and answer["consumption"]["held"] == 2
    with django_assert_num_queries(2):
        assert api.get("entitlements/check", {"feature": "messages", "group_id": "team"}).json()["consumption"]
    with django_assert_num_queries(1):
        assert api.get("entitlements/check", {"feature": "messages", "user_id": "ghost"}).json()["reason"] == (
            "unknown_user"
        )
    with django_assert_num_queries(1):
        assert api.get("entitlements/check", {"feature": "sso", "user_id": "u1"}).json()["reason"] == "binary_access"


# --- Consume: the pipelined path (PostgreSQL, outside any transaction) ---------------------


def _consume_sequence(tenant, user_id: str) -> list:
    """Every kind of consume answer for ``user_id`` (its own budget of 3 messages)."""
    answers = []
    for key, feature_key, delta in [
        (f"{user_id}-1", "messages", 1),
        (f"{user_id}-1", "messages", 1),  # a replay: the first answer again
        (f"{user_id}-2", "messages", 2),
        (f"{user_id}-3", "messages", 1),  # beyond the budget: refused, the key stays free
        (f"{user_id}-3", "messages", 0),
        (f"{user_id}-4", "sso", 1),  # binary
        (f"{user_id}-5", "exports", 1),  # not in the package
        (f"{user_id}-6", "missing", 1),
        (f"{user_id}-segment", "messages", 1),  # a stored Segment messageId used as a key
        (f"{user_id}-7", "archived", 1),
    ]:
        response = consume(tenant, user_id, feature_key, key, delta=delta)
        answers.append((response.status_code, response.json()))
    answers.append(consume(tenant, "ghost", "messages", f"{user_id}-8").json())
    return answers


@pytest.mark.django_db(transaction=True)
def test_a_pipelined_consume_answers_as_the_orm_path(tenant, monkeypatch):
    feature(tenant, "messages")
    feature(tenant, "exports")
    feature(tenant, "sso", type=FeatureType.BINARY)
    archived = feature(tenant, "archived")
    package(tenant, "plan", {"feature": "messages", "limit": 3}, {"feature": "sso"}, {"feature": "archived"})
    started = (timezone.now() - timedelta(days=3)).isoformat()  # one period for both
    for user_id in ("orm", "fast"):
        identify(tenant, user_id)
        subscribe(tenant, "plan", user_id=user_id, started_at=started)
        track(tenant, user_id, "Hello", messageId=f"{user_id}-segment", _at=datetime.now(UTC).isoformat())
    archived.archived_at = timezone.now()
    archived.save()

    calls = []
    real = access._consume_pipelined
    monkeypatch.setattr(access, "_consume_pipelined", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = _consume_sequence(tenant, "fast")
    assert len(calls) == 11
    monkeypatch.setattr(access.pipelined, "available", lambda: False)
    orm = _consume_sequence(tenant, "orm")
    assert len(calls) == 11
    assert fast == orm
    assert [answer["recorded"] for _, answer in fast[:5]] == [True, True, True, False, True]
    assert check(tenant, "messages", user_id="fast")["consumption"]["used"] == 3


def _grant_sequence(tenant, user_id: str) -> list:
    """Grants of every kind the budget statement stores an answer for, each sent twice (the
    second answers the stored answer): within a limit, over it with overage, unlimited,
    fractional amounts, beside a held reservation, on a group's budget."""
    answers = []
    for key, feature_key, delta in [
        (f"{user_id}-a", "messages", 0.25),
        (f"{user_id}-b", "messages", 1.5),
        (f"{user_id}-c", "messages", 1),  # 2.75 of 3, 0.5 held: over the limit, with overage
        (f"{user_id}-d", "messages", 0.125),
        (f"{user_id}-e", "exports", 2.5),  # unlimited
        (f"{user_id}-f", "seats", 1),  # the group's budget
        (f"{user_id}-g", "seats", 1),  # beyond it: refused
    ]:
        for _ in range(2):
            response = consume(tenant, user_id, feature_key, key, delta=delta)
            answers.append((response.status_code, response.json()))
    return answers


@pytest.mark.django_db(transaction=True)
def test_a_consume_stores_the_answer_it_gives_for_every_kind_of_grant_as_the_orm_path(tenant, monkeypatch):
    feature(tenant, "messages")
    feature(tenant, "exports")
    feature(tenant, "seats")
    package(
        tenant,
        "plan",
        {"feature": "messages", "limit": 3, "overage_enabled": True},
        {"feature": "exports", "limit": None},
    )
    package(tenant, "team", {"feature": "seats", "limit": 1.5})
    started = (timezone.now() - timedelta(days=3)).isoformat()
    for user_id in ("orm", "fast"):
        identify(tenant, user_id)
        join_group(tenant, user_id, f"team-{user_id}")
        subscribe(tenant, "plan", user_id=user_id, started_at=started)
        subscribe(tenant, "team", group_id=f"team-{user_id}", started_at=started)
        _hold(tenant, user_id, f"hold-{user_id}", 0.5)

    fast = _grant_sequence(tenant, "fast")
    monkeypatch.setattr(access.pipelined, "available", lambda: False)
    orm = _grant_sequence(tenant, "orm")
    assert fast == orm
    assert [answer["reason"] for _, answer in fast[::2]] == [
        "within_limit",
        "within_limit",
        "overage_enabled",
        "overage_enabled",
        "within_limit",
        "within_limit",
        "limit_reached",
    ]
    assert all(first == replayed for first, replayed in zip(fast[::2], fast[1::2], strict=True))
    assert fast[4][1]["consumption"] == {
        "used": 2.75,
        "budget": 3,
        "remaining": 0,
        "held": 0.5,
        "overage_enabled": True,
    }


@pytest.mark.django_db(transaction=True)
def test_a_consume_is_two_round_trips_recorded_refused_or_replayed_and_one_on_a_known_spent_budget(tenant):
    feature(tenant, "messages")
    identify(tenant, "u1")
    package(tenant, "plan", {"feature": "messages", "limit": 1})
    subscribe(tenant, "plan", user_id="u1")
    consume(tenant, "u1", "messages", "warm-up-unknown-user-key", delta=0)  # caches the API key
    check(tenant, "messages", user_id="u1")  # prepares the budget read alone (a spent budget's)

    def sent(key: str) -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            assert consume(tenant, "u1", "messages", key).status_code == 200
        assert not pipelined.in_transaction()
        return [query["sql"] for query in captured.captured_queries]

    recorded = sent("k1")
    assert len(recorded) == 2
    # One message: the idempotency lookup, the tried locks, the read that waits for them only
    # if the budget has room (when they were held), the budget read and the usage it grants
    # (prepared), then the COMMIT: the locks are never held across a client round trip.
    assert recorded[1].startswith("BEGIN; EXECUTE kana_") and recorded[1].count("EXECUTE") == 4
    assert recorded[1].endswith("; COMMIT")
    refused = sent("k2")
    assert len(refused) == 2 and refused[1].endswith("; COMMIT")
    # The budget is spent now, and this process knows it: the subject's offers and, beside them,
    # the lookup and the budget read in one statement: one round trip, no transaction.
    assert consume(tenant, "u1", "messages", "k0").json()["reason"] == "limit_reached"
    replayed = sent("k1")
    assert len(replayed) == 1 and replayed[0].startswith("EXECUTE kana_") and replayed[0].count("EXECUTE") == 2
    refused = sent("k3")
    assert len(refused) == 1 and refused[0].startswith("EXECUTE kana_") and refused[0].count("EXECUTE") == 2
    assert Usage.objects.filter(event__message_id__in=["k0", "k1", "k2", "k3"]).count() == 1


def test_the_statements_are_prepared_once_per_connection(corpus, django_assert_num_queries):
    api = ApiClient(corpus)
    api.get("entitlements/check", {"feature": "messages", "user_id": "u1"})
    # As a new connection: nothing prepared on the server, nothing recorded for it.
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    reads._prepared.clear()
    with CaptureQueriesContext(connection) as first:
        assert api.get("entitlements/check", {"feature": "messages", "user_id": "u1"}).status_code == 200
    sent = [q["sql"].split()[0] for q in first.captured_queries]
    assert sent == ["SELECT", "PREPARE", "EXECUTE", "PREPARE", "EXECUTE"]  # SELECT: what the server holds
    with django_assert_num_queries(2):
        assert api.get("entitlements/check", {"feature": "messages", "user_id": "u1"}).status_code == 200


def test_statements_discarded_behind_its_back_are_prepared_again_after_one_error(corpus):
    workspace = corpus.workspace
    question = {"feature_key": "messages", "user_id": "u1", "group_id": None, "delta": Decimal(1)}
    expected = access.check(workspace, **question).as_dict()
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    with pytest.raises(DatabaseError), transaction.atomic():
        access.check(workspace, **question)
    assert access.check(workspace, **question).as_dict() == expected


def test_nothing_is_prepared_when_connections_are_not_kept(corpus):
    api = ApiClient(corpus)
    api.get("entitlements/check", {"feature": "messages", "user_id": "u1"})  # caches the API key
    reads._prepared.clear()
    keep = connection.settings_dict["CONN_MAX_AGE"]
    connection.settings_dict["CONN_MAX_AGE"] = 0
    try:
        with CaptureQueriesContext(connection) as sent:
            assert api.get("entitlements/check", {"feature": "messages", "user_id": "u1"}).status_code == 200
    finally:
        connection.settings_dict["CONN_MAX_AGE"] = keep
    assert [q["sql"].split()[0] for q in sent.captured_queries] == ["WITH", "SELECT"]


# The budget read's plan under each statistics state: tests/test_entitlement_budget_plan.py.


@pytest.mark.django_db(transaction=True)
def test_a_spent_budget_is_refused_by_its_read_alone_and_decided_under_its_locks_once_it_has_room(tenant):
    feature(tenant, "messages")
    identify(tenant, "u1")
    package(tenant, "plan", {"feature": "messages", "limit": 2})
    subscribe(tenant, "plan", user_id="u1")
    access._SPENT.clear()
    access._SPENT_OFFERS.clear()
    assert consume(tenant, "u1", "messages", "k1").json()["recorded"] is True
    hold = ApiClient(tenant).post(
        "entitlements/reservations",
        {"user_id": "u1", "feature": "messages", "amount": 1, "ttl_seconds": 600, "idempotency_key": "h"},
    )
    assert hold.status_code == 201
    assert consume(tenant, "u1", "messages", "k2").json()["reason"] == "limit_reached"  # found spent

    with CaptureQueriesContext(connection) as captured:
        refused = consume(tenant, "u1", "messages", "k3").json()
    assert (refused["recorded"], refused["reason"], refused["consumption"]["held"]) == (False, "limit_reached", 1)
    # The offers, then the idempotency lookup and the budget read in one statement, one round
    # trip: no lock tried, no insert sent.
    assert captured.captured_queries[-1]["sql"].startswith("EXECUTE kana_")
    assert captured.captured_queries[-1]["sql"].count("EXECUTE") == 2
    assert consume(tenant, "u1", "messages", "k1").json()["recorded"] is True  # a replay still answers first

    released = ApiClient(tenant).post(f"entitlements/reservations/{hold.json()['id']}/release")
    assert released.status_code == 200
    with CaptureQueriesContext(connection) as captured:
        granted = consume(tenant, "u1", "messages", "k4").json()
    assert (granted["recorded"], granted["consumption"]["used"]) == (True, 2)
    assert [q["sql"].count("EXECUTE") for q in captured.captured_queries[-2:]] == [2, 4]  # read, then locked
    assert consume(tenant, "u1", "messages", "k5").json()["reason"] == "limit_reached"
    assert Usage.objects.filter(event__message_id__in=["k1", "k2", "k3", "k4", "k5"]).count() == 2
