"""A feature with usage is archived, never deleted: deleting it would delete its usage
(issue 11, defect 1: the CASCADE lost usage silently and re-creating the feature did not
bring it back)."""

from features.models import Event, EventStatus, Feature, UnmappedReason, Usage
from features.selectors import usage_totals

from .api_support import ApiClient, assert_error, feature


def _track(segment, message_id, delta=1):
    return segment.track("u-1", "Message Sent", {"featureId": "messages", "delta": delta}, messageId=message_id)


def test_a_feature_with_usage_cannot_be_deleted_and_its_usage_stays(tenant, segment):
    feature(tenant, "messages")
    assert _track(segment, "m-1", 3).json()["status"] == "mapped"

    assert_error(ApiClient(tenant).delete("features/messages"), 409, "feature_in_use", "id")

    assert Feature.objects.filter(key="messages").exists()
    assert Usage.objects.get().amount == 3
    assert Event.objects.get(message_id="m-1").status == EventStatus.MAPPED


def test_an_archived_feature_records_no_new_usage_and_keeps_its_history(tenant, segment):
    feature(tenant, "messages")
    _track(segment, "m-1", 3)
    api = ApiClient(tenant)

    archived = api.patch("features/messages", {"archived": True})

    assert archived.status_code == 200, archived.content
    assert archived.json()["archived"] is True
    later = _track(segment, "m-2", 5).json()
    assert (later["status"], later["reason"]) == ("unmapped", UnmappedReason.FEATURE_ARCHIVED)
    assert [u.amount for u in Usage.objects.all()] == [3]
    assert api.get("features/messages").json()["archived"] is True

    assert api.patch("features/messages", {"archived": False}).json()["archived"] is False
    assert _track(segment, "m-3", 7).json()["status"] == "mapped"
    assert sorted(u.amount for u in Usage.objects.all()) == [3, 7]


def test_a_feature_without_usage_or_rules_can_still_be_deleted(tenant, segment):
    feature(tenant, "messages")
    assert ApiClient(tenant).delete("features/messages").status_code == 204
    assert not Feature.objects.filter(key="messages").exists()


def test_usage_totals_survive_an_attempted_delete(tenant, segment):
    feature(tenant, "messages")
    for n in range(3):
        _track(segment, f"m-{n}", 2)
    ApiClient(tenant).delete("features/messages")
    totals = usage_totals(tenant.workspace)
    assert sum(t["total"] for t in totals) == 6
