"""Tenant isolation: a workspace's key never reads nor changes another workspace's data.

Both workspaces hold the same kinds of rows (users sharing an email, a feature and a rule
with the same key, events, usage, a merge); workspace A's key must see exactly A's.
"""

from dataclasses import dataclass

import pytest

from features.models import Event, Feature, MappingRule
from users.models import EndUser, MergeRecord

from .api_support import ApiClient, assert_error, feature, identify, rule, track


@dataclass
class Rows:
    users: list[int]
    rule: int
    event: int
    merge: int


def populate(tenant, prefix: str) -> Rows:
    feature(tenant, "exports")
    exports_rule = rule(tenant, "exports", "Exported")
    a = identify(tenant, f"{prefix}-a", email="same@example.com")
    b = identify(tenant, f"{prefix}-b", email="same@example.com")
    c = identify(tenant, f"{prefix}-c")
    track(tenant, f"{prefix}-a", "Exported")
    track(tenant, f"{prefix}-a", "Unmapped thing", secret=prefix)
    merged = ApiClient(tenant).post("users/merge", {"user_ids": [c.pk, identify(tenant, f"{prefix}-d").pk]})
    assert merged.status_code == 200
    return Rows(
        users=[a.pk, b.pk, c.pk],
        rule=exports_rule.pk,
        event=Event.objects.for_workspace(tenant.workspace).filter(name="Exported").get().pk,
        merge=MergeRecord.objects.for_workspace(tenant.workspace).get().pk,
    )


@pytest.fixture
def world(tenant, other_tenant):
    return populate(tenant, "mine"), populate(other_tenant, "theirs")


def test_lists_show_only_the_callers_rows(tenant, other_tenant, world):
    mine, theirs = world
    api = ApiClient(tenant)
    assert {u["id"] for u in api.get("users").json()["results"]} == set(mine.users)
    assert api.get("users", {"user_id": "theirs-a"}).json()["count"] == 0
    assert api.get("users", {"search": "theirs"}).json()["count"] == 0
    assert api.get("users", {"flag": "same_email"}).json()["count"] == 2
    [group] = api.get("users/duplicates").json()["results"]
    assert {u["id"] for u in group["users"]} == set(mine.users[:2])
    assert [f["id"] for f in api.get("features").json()["results"]] == ["exports"]
    assert [r["id"] for r in api.get("rules").json()["results"]] == [mine.rule]
    events = api.get("events").json()["results"]
    assert events and all(e["user_id"].startswith("mine-") for e in events)
    assert api.get("events", {"user_id": "theirs-a"}).json()["count"] == 0
    summary = api.get("events/unmapped/summary").json()
    assert summary["events"] == [{"event": "Unmapped thing", "reason": "no_matching_rule", "count": 1}]
    assert {"property": "secret", "value": "theirs", "count": 1} not in summary["properties"]
    assert [r["user"] for r in api.get("usage").json()["results"]] == [mine.users[0]]
    assert api.get("usage", {"user_id": "theirs-a"}).json()["count"] == 0
    assert [m["id"] for m in api.get("merges").json()["results"]] == [mine.merge]
    assert api.get("merges", {"user": theirs.users[2]}).json()["count"] == 0


def test_another_workspaces_objects_are_404(tenant, other_tenant, world):
    _mine, theirs = world
    api = ApiClient(tenant)
    user = theirs.users[0]
    for path in (f"users/{user}", f"users/{user}/usage", f"rules/{theirs.rule}", f"events/{theirs.event}"):
        assert_error(api.get(path), 404, "not_found")
    assert_error(api.get(f"merges/{theirs.merge}"), 404, "not_found")
    assert_error(api.patch(f"users/{user}", {"name": "hacked"}), 404, "not_found")
    assert_error(api.delete(f"users/{user}"), 404, "not_found")
    assert_error(api.patch(f"rules/{theirs.rule}", {"name": "hacked"}), 404, "not_found")
    assert_error(api.delete(f"rules/{theirs.rule}"), 404, "not_found")
    # Feature ids are per workspace: "exports" names A's own feature, B's are unreachable.
    Feature.objects.for_workspace(tenant.workspace).filter(key="exports").update(name="mine")
    assert api.get("features/exports").json()["name"] == "mine"
    feature(other_tenant, "only-theirs")
    assert_error(api.get("features/only-theirs"), 404, "not_found")
    assert_error(api.patch("features/only-theirs", {"name": "hacked"}), 404, "not_found")
    assert_error(api.delete("features/only-theirs"), 404, "not_found")
    assert_error(api.post("rules", {"name": "r", "feature": "only-theirs", "event": "x"}), 404, "unknown_feature")

    assert EndUser.objects.get(pk=user).name == ""
    assert MappingRule.objects.get(pk=theirs.rule).name == "rule"
    assert Feature.objects.get(workspace=other_tenant.workspace, key="only-theirs").name == "Only-Theirs"


def test_merging_another_workspaces_users_is_refused_like_unknown_ids(tenant, other_tenant, world):
    mine, theirs = world
    api = ApiClient(tenant)
    foreign = api.post("users/merge", {"user_ids": [mine.users[0], theirs.users[0]]})
    missing = api.post("users/merge", {"user_ids": [mine.users[0], 10**12]})
    assert_error(foreign, 404, "unknown_user", "user_ids")
    assert foreign.json()["code"] == missing.json()["code"]
    assert_error(
        api.post("users/merge", {"user_ids": [mine.users[0]], "survivor": theirs.users[1]}), 404, "unknown_user"
    )
    assert EndUser.objects.filter(pk__in=[mine.users[0], *theirs.users]).count() == 4
    assert MergeRecord.objects.for_workspace(tenant.workspace).count() == 1


def test_a_revoked_key_is_401(tenant):
    from kana.models import ApiKey
    from kana.services import api_key_revoke

    api_key_revoke(api_key=ApiKey.objects.get(workspace=tenant.workspace))
    assert_error(ApiClient(tenant).get("users"), 401, "invalid_api_key")
