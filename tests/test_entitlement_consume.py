"""POST /api/v1/entitlements/consume: check and record atomically; never overspends (SPEC §11)."""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime

import pytest
from django.db import connections

from entitlements.access import Subject
from features.models import Feature, Usage
from kana.locks import lock_keys_statement
from users.models import EndUser

from .api_support import feature, track
from .conftest import ROOT, database_url_for_subprocess, requires_postgres
from .entitlement_consume_support import in_parallel
from .entitlement_support import check, consume, join_group, package, subscribe, user_with_package

# Every test runs on both routes: Django's views and the lean front (api.lean).
pytestmark = pytest.mark.usefixtures("api_route")


def test_it_records_within_the_budget_and_refuses_beyond_it(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 2)
    first = consume(tenant, "u1", "messages", "c1").json()
    assert (first["access"], first["recorded"], first["reason"]) == (True, True, "within_limit")
    assert first["consumption"]["used"] == 1 and first["consumption"]["remaining"] == 1
    assert consume(tenant, "u1", "messages", "c2").json()["recorded"] is True
    refused = consume(tenant, "u1", "messages", "c3")
    assert refused.status_code == 200
    assert (refused.json()["access"], refused.json()["recorded"], refused.json()["reason"]) == (
        False,
        False,
        "limit_reached",
    )
    assert Usage.objects.for_workspace(tenant.workspace).count() == 2


def test_the_same_key_three_times_consumes_once(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 5)
    answers = [consume(tenant, "u1", "messages", "same", delta=2).json() for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]
    assert check(tenant, "messages", user_id="u1")["consumption"]["used"] == 2


def test_unknown_user_and_feature_are_answers(tenant):
    feature(tenant, "messages")
    assert consume(tenant, "ghost", "messages", "k").json()["reason"] == "unknown_user"
    assert consume(tenant, "ghost", "nope", "k").json()["reason"] == "unknown_feature"


@requires_postgres
@pytest.mark.postgres
def test_sixteen_parallel_consumes_of_the_last_ten_units_exactly_ten_succeed(transactional_db, tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 100)
    track(tenant, "u1", "Sent", featureId="messages", delta=90, _at=datetime.now(UTC).isoformat())

    results = in_parallel(
        tenant, [lambda c, i=i: consume(tenant, "u1", "messages", f"par-{i}", client=c) for i in range(16)]
    )

    assert Counter(status for status, _ in results) == {200: 16}
    assert Counter((a["recorded"], a["reason"]) for _, a in results) == {
        (True, "within_limit"): 10,
        (False, "limit_reached"): 6,
    }
    assert check(tenant, "messages", user_id="u1")["consumption"]["used"] == 100


@requires_postgres
@pytest.mark.postgres
def test_members_of_one_group_racing_for_its_budget_never_overspend_it(transactional_db, tenant):
    feature(tenant, "messages")
    package(tenant, "team", {"feature": "messages", "limit": 5})
    for n in range(4):
        track(tenant, f"m{n}", "Hello", _at=datetime.now(UTC).isoformat())
        join_group(tenant, f"m{n}", "acme")
    subscribe(tenant, "team", group_id="acme")

    results = in_parallel(
        tenant, [lambda c, i=i: consume(tenant, f"m{i % 4}", "messages", f"g-{i}", client=c) for i in range(12)]
    )

    assert sum(a["recorded"] for _, a in results) == 5
    assert check(tenant, "messages", group_id="acme")["consumption"]["used"] == 5


def _consume_in_a_thread(pool, tenant, user_id: str, key: str):
    def run():
        try:
            return consume(tenant, user_id, "messages", key).json()
        finally:
            connections.close_all()

    return pool.submit(run)


@requires_postgres
@pytest.mark.postgres
def test_a_spent_budget_refuses_without_waiting_for_its_lock_and_one_with_room_waits(transactional_db, tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "spent", 1)
    user_with_package(tenant, "roomy", 5)
    assert consume(tenant, "spent", "messages", "s-1").json()["recorded"] is True
    messages = Feature.objects.for_workspace(tenant.workspace).get(key="messages")
    lock_ids = []
    for user_id in ("spent", "roomy"):
        user_pk = EndUser.objects.for_workspace(tenant.workspace).get(user_id=user_id).pk
        keys = Subject(user_pk=user_pk).lock_keys(tenant.workspace.pk, messages.pk)
        lock_ids += lock_keys_statement(keys)[1].values()
    holder = connections.create_connection("default")  # another session holds both budgets' locks
    try:
        with holder.cursor() as cursor:
            cursor.execute("BEGIN")
            for lock_id in lock_ids:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id])
        with ThreadPoolExecutor(max_workers=2) as pool:
            refused = _consume_in_a_thread(pool, tenant, "spent", "s-2").result(timeout=10)
            assert (refused["recorded"], refused["reason"]) == (False, "limit_reached")
            waiting = _consume_in_a_thread(pool, tenant, "roomy", "r-1")
            with pytest.raises(FutureTimeout):
                waiting.result(timeout=1)  # a budget with room is decided under its lock
            with holder.cursor() as cursor:
                cursor.execute("ROLLBACK")
            assert waiting.result(timeout=10)["recorded"] is True
    finally:
        holder.close()


# One process: consumes 1 of "messages" for "hot", ``count`` times, from ``start`` (epoch
# seconds) on, keys ``<prefix>-<n>``; prints its answers' (recorded, reason) as JSON.
_CONSUMER = """
import json, sys, time
from decimal import Decimal
import django
django.setup()
from entitlements import access
from kana.models import Workspace
workspace_id, start, count, prefix = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
workspace = Workspace.objects.get(pk=workspace_id)
time.sleep(max(0.0, start - time.time()))
answers = []
for n in range(count):
    answer, _ = access.consume(
        workspace, user_id="hot", feature_key="messages", delta=Decimal(1), idempotency_key=f"{prefix}-{n}"
    )
    answers.append([answer["recorded"], answer["reason"]])
print(json.dumps(answers))
"""


@requires_postgres
@pytest.mark.postgres
def test_eight_processes_consuming_one_budget_past_its_limit_record_exactly_the_limit(transactional_db, tenant):
    # Real processes, each with its own connection and prepared statements, racing on one
    # budget as S7's hot subject does: the lock, the read after it and the insert in one message.
    feature(tenant, "messages")
    user_with_package(tenant, "hot", 30)
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocess(),
        "DJANGO_SETTINGS_MODULE": "kana.settings",
        "KANA_DEBUG": "1",
    }
    start = time.time() + 3  # every process set up before the first consume
    argv = [sys.executable, "-c", _CONSUMER, str(tenant.workspace.pk), str(start), "10"]
    processes = [
        subprocess.Popen([*argv, f"p{i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for i in range(8)
    ]
    answers = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        answers += [tuple(answer) for answer in json.loads(out)]

    assert Counter(answers) == {(True, "within_limit"): 30, (False, "limit_reached"): 50}
    hot = EndUser.objects.for_workspace(tenant.workspace).get(user_id="hot")
    assert Usage.objects.for_workspace(tenant.workspace).filter(user=hot).count() == 30
    assert check(tenant, "messages", user_id="hot")["consumption"]["used"] == 30
