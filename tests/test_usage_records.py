"""POST /api/v1/usage/records: add and set, idempotency shared with Segment's messageIds."""

from datetime import UTC, datetime

from features.models import Event, Usage

from .api_support import ApiClient, assert_error, feature
from .entitlement_support import check, user_with_package


def record(tenant, key, delta=1, action="add", user_id="u1", **fields):
    body = {"user_id": user_id, "feature": "messages", "delta": delta, "action": action, "idempotency_key": key}
    return ApiClient(tenant).post("usage/records", {**body, **fields})


def test_a_key_sent_three_times_records_once_and_answers_the_first_answer(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    first = record(tenant, "k-1", delta=4)
    assert first.status_code == 201, first.content
    assert first.json() == {
        "recorded": True,
        "reason": "within_limit",
        "consumption": {"used": 4, "budget": 10, "remaining": 6, "held": 0, "overage_enabled": False},
    }
    for _ in range(2):
        again = record(tenant, "k-1", delta=4)
        assert (again.status_code, again.json()) == (200, first.json())
    assert Usage.objects.for_workspace(tenant.workspace).count() == 1
    assert check(tenant, "messages", user_id="u1")["consumption"]["used"] == 4


def test_a_segment_message_id_used_as_a_key_is_a_replay(tenant, segment):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    now = datetime.now(UTC).isoformat()
    assert segment.track("u1", "Sent", {"featureId": "messages"}, messageId="seg-1", timestamp=now).status_code == 200

    replay = record(tenant, "seg-1", delta=5)

    assert replay.status_code == 200 and replay.json()["recorded"] is False
    assert check(tenant, "messages", user_id="u1")["consumption"]["used"] == 1
    # ...and the other way round: a key already used makes the Segment message a duplicate.
    record(tenant, "api-1", delta=2)
    assert segment.track("u1", "Sent", {"featureId": "messages"}, messageId="api-1").json().get("status") != "mapped"
    assert Event.objects.for_workspace(tenant.workspace).filter(message_id="api-1").count() == 1
    assert check(tenant, "messages", user_id="u1")["consumption"]["used"] == 3


def test_set_records_the_difference_to_the_periods_used(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 100)
    record(tenant, "a", delta=30)
    answer = record(tenant, "b", delta=12, action="set").json()
    assert answer["consumption"]["used"] == 12
    assert sorted(Usage.objects.values_list("amount", flat=True)) == [-18, 30]


def test_unknown_and_archived_features_are_refused(tenant):
    feature(tenant, "messages")
    assert_error(record(tenant, "x", user_id="u9", feature="nope"), 404, "unknown_feature", "feature")
    ApiClient(tenant).patch("features/messages", {"archived": True})
    assert_error(record(tenant, "y"), 409, "feature_archived")


def test_a_deleted_users_user_id_records_nothing(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    from users.selectors import user_pk_for
    from users.services import delete_user

    delete_user(workspace=tenant.workspace, user_pk=user_pk_for(tenant.workspace, "u1"))
    assert_error(record(tenant, "after-delete"), 409, "user_suppressed", "user_id")
