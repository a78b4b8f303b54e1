"""Reservations: holds count against the budget, commit and release are idempotent, expiry frees them."""

from collections import Counter
from datetime import timedelta

import pytest
from django.utils import timezone

from entitlements.access import expire_reservations
from entitlements.models import Reservation
from features.models import Usage

from .api_support import ApiClient, assert_error, feature
from .conftest import requires_postgres
from .entitlement_consume_support import in_parallel
from .entitlement_support import check, consume, user_with_package


def hold(tenant, key, amount, ttl=60, client=None):
    body = {"user_id": "u1", "feature": "messages", "amount": amount, "ttl_seconds": ttl, "idempotency_key": key}
    return (client or ApiClient(tenant)).post("entitlements/reservations", body)


def test_a_hold_counts_against_checks_consumes_and_other_holds(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    created = hold(tenant, "h1", 7)
    assert created.status_code == 201, created.content
    assert created.json()["status"] == "held"
    assert hold(tenant, "h1", 7).json()["id"] == created.json()["id"]  # the same key: the same hold

    assert check(tenant, "messages", user_id="u1")["consumption"] | {} == {
        "used": 0,
        "budget": 10,
        "remaining": 3,
        "held": 7,
        "overage_enabled": False,
    }
    assert_error(hold(tenant, "h2", 4), 409, "limit_reached")
    assert consume(tenant, "u1", "messages", "c1", delta=4).json()["recorded"] is False
    assert consume(tenant, "u1", "messages", "c2", delta=3).json()["recorded"] is True


def test_commit_records_at_most_the_hold_and_is_idempotent(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    api = ApiClient(tenant)
    reservation = hold(tenant, "h1", 5).json()
    assert_error(
        api.post(f"entitlements/reservations/{reservation['id']}/commit", {"amount": 6}), 400, "invalid_amount"
    )
    for _ in range(2):
        committed = api.post(f"entitlements/reservations/{reservation['id']}/commit", {"amount": 4})
        assert committed.status_code == 200 and committed.json()["status"] == "committed"
    assert Usage.objects.for_workspace(tenant.workspace).get().amount == 4
    assert check(tenant, "messages", user_id="u1")["consumption"] | {} == {
        "used": 4,
        "budget": 10,
        "remaining": 6,
        "held": 0,
        "overage_enabled": False,
    }
    assert_error(api.post(f"entitlements/reservations/{reservation['id']}/release"), 409, "reservation_committed")


def test_release_frees_the_hold_and_is_idempotent(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    api = ApiClient(tenant)
    reservation = hold(tenant, "h1", 10).json()
    for _ in range(2):
        assert api.post(f"entitlements/reservations/{reservation['id']}/release").json()["status"] == "released"
    assert check(tenant, "messages", user_id="u1")["consumption"]["remaining"] == 10
    assert_error(api.post(f"entitlements/reservations/{reservation['id']}/commit"), 409, "reservation_released")


def test_an_expired_hold_frees_itself_and_cannot_be_committed(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    api = ApiClient(tenant)
    reservation = hold(tenant, "h1", 10).json()
    Reservation.objects.filter(pk=reservation["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))

    assert check(tenant, "messages", user_id="u1")["consumption"]["held"] == 0  # lazily, before any sweep
    assert api.get(f"entitlements/reservations/{reservation['id']}").json()["status"] == "expired"
    assert_error(api.post(f"entitlements/reservations/{reservation['id']}/commit"), 409, "reservation_expired")
    assert Reservation.objects.get(pk=reservation["id"]).status == "expired"


def test_the_sweep_marks_expired_holds(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    hold(tenant, "h1", 1)
    hold(tenant, "h2", 1)
    Reservation.objects.filter(idempotency_key="h1").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert expire_reservations() == 1
    assert dict(Reservation.objects.values_list("idempotency_key", "status")) == {"h1": "expired", "h2": "held"}


@requires_postgres
@pytest.mark.postgres
def test_sixteen_parallel_holds_and_consumes_never_overspend(transactional_db, tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    # A hold that has expired frees its units for the racers.
    stale = hold(tenant, "stale", 5).json()
    Reservation.objects.filter(pk=stale["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))

    calls = [lambda c, i=i: hold(tenant, f"par-{i}", 1, client=c) for i in range(8)]
    calls += [lambda c, i=i: consume(tenant, "u1", "messages", f"con-{i}", client=c) for i in range(8)]
    results = in_parallel(tenant, calls)

    held = sum(1 for status, _ in results[:8] if status == 201)
    consumed = sum(1 for _, answer in results[8:] if answer.get("recorded"))
    assert held + consumed == 10
    assert Counter(status for status, _ in results[:8]) <= Counter({201: 8, 409: 8})
    assert check(tenant, "messages", user_id="u1")["consumption"]["remaining"] == 0
