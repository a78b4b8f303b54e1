"""The unmapped-events explorer: what is not mapped yet, grouped to help write rules (SPEC §6)."""

import pytest

from features.rules import condition_matches
from features.selectors import unmapped_by_event, unmapped_by_property
from tests.conftest import SegmentClient
from tests.usage_support import make_feature, make_rule, make_user, store_unmapped_events

pytestmark = pytest.mark.usefixtures("tasks_in_process")


def test_it_groups_unmapped_events_by_name_and_reason_with_counts(segment, tenant):
    make_feature(tenant.workspace, "messages")
    for _ in range(3):
        segment.track("u1", "Report Exported", {"format": "csv"})
    segment.track("u1", "Invite Sent")
    segment.track("u1", "Credits Used", {"featureId": "credits"})
    segment.track("u1", "Credits Used", {"featureId": "messages", "delta": "x"})
    segment.track("u1", "Message Sent", {"featureId": "messages"})  # mapped: not listed
    groups = unmapped_by_event(tenant.workspace)
    assert groups[0] == {"event": "Report Exported", "reason": "no_matching_rule", "count": 3}  # most first
    assert sorted(groups[1:], key=lambda g: (g["event"], g["reason"])) == [
        {"event": "Credits Used", "reason": "invalid_delta", "count": 1},
        {"event": "Credits Used", "reason": "unknown_feature", "count": 1},
        {"event": "Invite Sent", "reason": "no_matching_rule", "count": 1},
    ]
    assert len(unmapped_by_event(tenant.workspace, limit=2)) == 2


def test_it_lists_property_paths_and_values_in_rule_notation(segment, tenant):
    segment.track("u1", "Report Exported", {"plan": {"tier": "pro"}, "items": [{"sku": "a"}, {"sku": "b"}]})
    segment.track("u2", "Report Exported", {"plan": {"tier": "pro"}, "count": 3, "flag": True})
    segment.track("u3", "Report Exported", {"plan": {"tier": "free"}, "note": "x" * 200})
    segment.track("u3", "Invite Sent", {"plan": {"tier": "team"}})

    summary = unmapped_by_property(tenant.workspace, event="Report Exported")
    assert summary["sampled_events"] == 3
    rows = {(r["property"], r["value"]): r["count"] for r in summary["rows"]}
    assert rows[("plan.tier", "pro")] == 2
    assert rows[("plan.tier", "free")] == 1
    assert rows[("items.sku", "a")] == 1 and rows[("items.sku", "b")] == 1
    assert rows[("count", 3)] == 1 and rows[("flag", True)] == 1
    assert ("plan.tier", "team") not in rows
    assert ("note", "x" * 80) in rows  # long values are cut
    assert summary["rows"][0] == {"property": "plan.tier", "value": "pro", "count": 2}  # most common first

    everything = unmapped_by_property(tenant.workspace)
    assert everything["sampled_events"] == 4
    assert {(r["property"], r["value"]) for r in everything["rows"]} >= {("plan.tier", "team")}


def test_a_row_becomes_a_rule_that_maps_exactly_what_it_counted(segment, tenant, django_capture_on_commit_callbacks):
    user = make_user(tenant.workspace, "u1")
    store_unmapped_events(
        tenant.workspace,
        user,
        [("Report Exported", {"plan": {"tier": "pro" if i % 3 else "free"}}) for i in range(9)],
    )
    row = next(r for r in unmapped_by_property(tenant.workspace)["rows"] if r["value"] == "pro")
    condition = {"property": row["property"], "operator": "equals", "value": row["value"]}
    assert condition_matches({"plan": {"tier": "pro"}}, condition)
    make_feature(tenant.workspace, "pro-exports")
    with django_capture_on_commit_callbacks(execute=True):
        make_rule(tenant.workspace, "pro-exports", event="Report Exported", conditions=[condition])
    assert row["count"] == 6
    assert unmapped_by_event(tenant.workspace) == [
        {"event": "Report Exported", "reason": "no_matching_rule", "count": 3}
    ]
    assert [(r["property"], r["value"]) for r in unmapped_by_property(tenant.workspace)["rows"]] == [
        ("plan.tier", "free")
    ]


def test_another_workspace_sees_none_of_it(segment, tenant, other_tenant):
    segment.track("u1", "Report Exported", {"plan": "pro"})
    assert unmapped_by_event(other_tenant.workspace) == []
    assert unmapped_by_property(other_tenant.workspace) == {"sampled_events": 0, "rows": []}
    SegmentClient(other_tenant).track("u1", "Other")
    assert [r["event"] for r in unmapped_by_event(tenant.workspace)] == ["Report Exported"]
