"""Deleting a user (SPEC §12): events kept (detached, anonymised) or deleted, its userIds
suppressed; later messages naming them answer ``suppressed`` and are not stored."""

import pytest
from django.db.models import Sum

from features.models import Event, EventStatus, Usage
from kana.models import AuditEntry
from users.models import EndUser, Suppression
from users.selectors import user_pk_for
from users.services import delete_user

from .api_support import ApiClient, assert_error
from .conftest import SegmentClient


def _feature_totals(tenant) -> dict:
    rows = Usage.objects.for_workspace(tenant.workspace).values("feature__key").annotate(total=Sum("amount"))
    return {row["feature__key"]: row["total"] for row in rows}


@pytest.fixture
def gone(tenant, segment, exports_and_seats):
    """A user "gone" (also known as "gone-old" by an alias) with usage, and a user "kept"."""
    assert (
        segment.identify("gone", {"email": "gone@example.com", "name": "Gone"}, anonymousId="anon-g").status_code == 200
    )
    assert segment.post("/v1/alias", {"previousId": "gone-old", "userId": "gone"}).status_code == 200
    for user_id, amount in (("gone", 2), ("gone", 3), ("kept", 5)):
        answer = segment.track(
            user_id, "Exported", {"featureId": "exports", "delta": amount}, context={"ip": "1.2.3.4"}
        )
        assert answer.json()["status"] == "mapped"
    return EndUser.objects.get(user_id="gone")


def test_keep_detaches_and_anonymises_events_and_keeps_feature_totals(tenant, gone):
    before = _feature_totals(tenant)
    response = ApiClient(tenant).delete(f"users/{gone.pk}")
    assert response.status_code == 204, response.content

    assert not EndUser.objects.filter(pk=gone.pk).exists()
    assert _feature_totals(tenant) == before  # 10: 2 + 3 of the deleted user's, 5 of "kept"
    assert Usage.objects.filter(user__isnull=True).aggregate(total=Sum("amount"))["total"] == 5
    detached = Event.objects.for_workspace(tenant.workspace).filter(user__isnull=True)
    assert detached.count() == 4  # identify, alias, two tracks
    for event in detached:
        assert event.external_user_id == ""
        assert not {"userId", "anonymousId", "previousId", "traits", "context"} & set(event.payload), event.payload
    assert detached.filter(status=EventStatus.MAPPED).first().payload["properties"]["delta"] in (2, 3)
    assert set(Suppression.objects.for_workspace(tenant.workspace).values_list("user_id", flat=True)) == {
        "gone",
        "gone-old",
    }
    entry = AuditEntry.objects.get(action="user.delete")
    assert entry.after == {"events": "keep", "suppress": True} and set(entry.before["user_ids"]) == {"gone", "gone-old"}


def test_delete_removes_events_and_usage(tenant, gone):
    response = ApiClient(tenant).delete(f"users/{gone.pk}?events=delete")
    assert response.status_code == 204, response.content
    assert _feature_totals(tenant) == {"exports": 5}
    assert not Event.objects.filter(external_user_id__in=["gone", "gone-old"]).exists()
    assert Event.objects.filter(user__isnull=True).count() == 0
    assert Suppression.objects.for_workspace(tenant.workspace).count() == 2
    assert AuditEntry.objects.get(action="user.delete").after == {"events": "delete", "suppress": True}


def test_an_unknown_events_choice_is_refused_and_changes_nothing(tenant, gone):
    assert_error(ApiClient(tenant).delete(f"users/{gone.pk}?events=purge"), 400, "invalid_request", "events")
    assert EndUser.objects.filter(pk=gone.pk).exists()
    assert not Suppression.objects.exists() and not AuditEntry.objects.filter(action="user.delete").exists()


def _stored(tenant) -> int:
    return Event.objects.for_workspace(tenant.workspace).count()


def test_later_messages_naming_a_suppressed_user_id_are_answered_and_not_stored(tenant, segment, gone):
    delete_user(workspace=tenant.workspace, user_pk=gone.pk)
    stored = _stored(tenant)
    calls = [
        ("/v1/track", {"userId": "gone", "event": "Exported", "properties": {"featureId": "exports"}}),
        ("/v1/page", {"userId": "gone-old", "name": "Pricing"}),
        ("/v1/screen", {"userId": "gone", "name": "Home"}),
        ("/v1/identify", {"userId": "gone", "traits": {"email": "back@example.com"}}),
        ("/v1/group", {"userId": "gone", "groupId": "g1"}),
        ("/v1/alias", {"previousId": "gone", "userId": "someone-new"}),
        ("/v1/alias", {"previousId": "someone-else", "userId": "gone-old"}),
        ("/segment/events", {"type": "track", "userId": "gone", "event": "Exported"}),
    ]
    for path, body in calls:
        response = segment.post(path, body)
        assert response.status_code == 200, response.content
        assert response.json()["status"] == "suppressed", (path, response.json())
    assert _stored(tenant) == stored
    assert user_pk_for(tenant.workspace, "gone") is None and user_pk_for(tenant.workspace, "someone-new") is None
    assert Usage.objects.for_workspace(tenant.workspace).count() == 3


def test_a_batch_lists_its_suppressed_messages_and_stores_the_others(tenant, segment, gone):
    delete_user(workspace=tenant.workspace, user_pk=gone.pk, events="delete")
    batch = [
        {"type": "track", "userId": "gone", "event": "Exported", "messageId": "b0"},
        {"type": "track", "userId": "kept", "event": "Exported", "messageId": "b1"},
        {"type": "identify", "userId": "gone-old", "messageId": "b2"},
        {"type": "identify", "userId": "fresh", "messageId": "b3"},
        {"type": "track", "event": "no user", "messageId": "b4"},
        *({"type": "track", "userId": "gone", "event": "E", "messageId": f"many-{n}"} for n in range(10)),
    ]
    answer = segment.batch(batch).json()
    assert answer["accepted"] == 2 and answer["duplicates"] == 0
    assert [r["index"] for r in answer["rejected"]] == [4]
    assert [s["index"] for s in answer["suppressed"]] == [0, 2, *range(5, 15)]
    assert answer["suppressed"][0] == {"index": 0, "message_id": "b0"} and "pending" not in answer
    assert set(Event.objects.for_workspace(tenant.workspace).values_list("message_id", flat=True)) >= {"b1", "b3"}
    assert not Event.objects.filter(message_id__in=["b0", "b2", "many-0"]).exists()
    # A replay of the batch: the suppressed are suppressed again, the stored are duplicates.
    again = segment.batch(batch).json()
    assert (again["accepted"], again["duplicates"], len(again["suppressed"])) == (0, 2, 12)


def test_suppression_is_per_workspace(tenant, other_tenant, gone):
    delete_user(workspace=tenant.workspace, user_pk=gone.pk)
    response = SegmentClient(other_tenant).track("gone", "Exported")
    assert response.json()["status"] == "unmapped"


def test_the_dashboard_offers_keep_or_delete(member_client, tenant, gone):
    page = member_client.get(f"/users/{gone.pk}/delete/").content.decode()
    assert 'value="keep" checked' in page and 'value="delete"' in page
    response = member_client.post(f"/users/{gone.pk}/delete/", {"events": "delete"})
    assert response.status_code == 302
    assert _feature_totals(tenant) == {"exports": 5}
    entry = AuditEntry.objects.get(action="user.delete")
    assert entry.after == {"events": "delete", "suppress": True} and entry.actor.startswith("user:")


def test_a_delete_without_suppression_lets_the_next_identify_create_the_user_anew(tenant, segment, gone):
    api = ApiClient(tenant)
    assert api.delete(f"users/{gone.pk}?suppress=false").status_code == 204
    assert not Suppression.objects.exists()
    assert AuditEntry.objects.get(action="user.delete").after == {"events": "keep", "suppress": False}
    answer = segment.identify("gone", {"email": "back@example.com"})
    assert answer.json()["status"] != "suppressed", answer.json()
    assert EndUser.objects.get(user_id="gone").pk != gone.pk


def test_a_bad_suppress_value_is_refused_and_changes_nothing(tenant, gone):
    assert_error(ApiClient(tenant).delete(f"users/{gone.pk}?suppress=maybe"), 400, "invalid_request", "suppress")
    assert EndUser.objects.filter(pk=gone.pk).exists()


def test_suppressions_are_listed_and_a_lifted_one_lets_messages_in_again(tenant, other_tenant, segment, gone):
    delete_user(workspace=tenant.workspace, user_pk=gone.pk)
    api = ApiClient(tenant)
    listed = api.get("suppressions").json()
    assert listed["count"] == 2 and {row["user_id"] for row in listed["results"]} == {"gone", "gone-old"}
    [old] = api.get("suppressions", {"user_id": "gone-old"}).json()["results"]
    assert set(old) == {"id", "user_id", "created_at"}

    # Another workspace neither sees nor lifts it.
    assert ApiClient(other_tenant).get("suppressions").json()["count"] == 0
    assert_error(ApiClient(other_tenant).delete(f"suppressions/{old['id']}"), 404, "not_found")

    assert api.delete(f"suppressions/{old['id']}").status_code == 204
    assert_error(api.delete(f"suppressions/{old['id']}"), 404, "not_found")
    entry = AuditEntry.objects.get(action="suppression.delete")
    assert (entry.object_type, entry.object_id, entry.before["user_id"]) == ("suppression", str(old["id"]), "gone-old")
    # "gone-old" is stored again; "gone" still is not.
    assert segment.track("gone-old", "Exported").json()["status"] != "suppressed"
    assert segment.track("gone", "Exported").json()["status"] == "suppressed"
