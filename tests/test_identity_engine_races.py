"""The identity engine against a concurrent writer (PostgreSQL, real connections).

Issue 11, defect 2: the CSV path's COPY raised psycopg's UniqueViolation, which the retry did
not recognise, so an import colliding with a concurrent identify failed instead of retrying.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections, transaction
from django.utils import timezone

from users import services
from users.identity import build_new_users
from users.models import EndUser, UserIdentity
from users.profile import validated_changes

from .conftest import requires_postgres

pytestmark = [requires_postgres, pytest.mark.postgres]


@pytest.mark.parametrize("built_ahead", [False, True], ids=["built by the engine", "built ahead"])
def test_a_csv_batch_colliding_with_an_uncommitted_identify_retries_and_updates_that_user(
    transactional_db, tenant, built_ahead
):
    """``built_ahead``: the CSV import's users built before the batch's read
    (``build_new_users``); the first pass gave them ids, so the retry builds its own."""
    rows = []
    for i in range(10):  # enough rows for the COPY path
        changes, _ = validated_changes(name=f"Row {i}")
        rows.append(services.ProfileRow(changes=changes, user_id=f"x-{i}", label=f"row {i}"))
    built = build_new_users(workspace=tenant.workspace, rows=rows, occurred_at=timezone.now()) if built_ahead else None
    held, release = threading.Event(), threading.Event()

    def identify_and_hold():  # another connection identifies x-0 and keeps its transaction open
        try:
            with transaction.atomic():
                changes, _ = validated_changes(email="x0@example.com")
                services.identify_user(
                    workspace=tenant.workspace, user_id="x-0", changes=changes, occurred_at=timezone.now()
                )
                held.set()
                assert release.wait(timeout=30)
        finally:
            connections.close_all()

    def import_rows():
        try:
            return services.apply_profile_rows(
                workspace=tenant.workspace, rows=rows, occurred_at=timezone.now(), touched={}, new_users=built
            )
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        holder = pool.submit(identify_and_hold)
        assert held.wait(timeout=30)
        importing = pool.submit(import_rows)
        time.sleep(1)  # the batch's COPY now waits on x-0's uncommitted row
        assert not importing.done()
        release.set()
        holder.result(timeout=30)
        outcomes = importing.result(timeout=60)

    assert [getattr(o, "code", None) for o in outcomes] == [None] * 10, outcomes
    assert outcomes[0].outcome == "updated"  # the retry found x-0 and updated it
    assert {o.outcome for o in outcomes[1:]} == {"created"}
    assert EndUser.objects.filter(user_id="x-0").count() == 1
    x0 = EndUser.objects.get(user_id="x-0")
    assert (x0.name, x0.email) == ("Row 0", "x0@example.com")
    assert UserIdentity.objects.filter(external_id__startswith="x-").count() == 10
    if built_ahead:
        assert not any(outcome.user is user for outcome, user in zip(outcomes, built, strict=True))
        assert [EndUser.objects.get(user_id=f"x-{i}").name for i in range(10)] == [f"Row {i}" for i in range(10)]
