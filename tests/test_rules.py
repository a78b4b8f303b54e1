"""Mapping rules: the condition evaluator, validation, and rules applied to stored events (SPEC §6)."""

from datetime import timedelta
from decimal import Decimal

import pytest

from features.mapping import RuleSet, decide
from features.models import Event, EventStatus, ReprocessingJob, UnmappedReason, Usage
from features.rules import (
    AmountError,
    CompiledRule,
    InvalidRule,
    clean_conditions,
    condition_matches,
    parse_amount,
    read_amount,
    read_default_amount,
)
from features.selectors import reprocessing_of
from features.services import FeatureError, RuleDefinition, rule_create, rule_delete, rule_update
from tests.usage_support import T0, make_feature, make_rule, make_user, store_unmapped_events, usage_count, usage_total

# Rules created over stored events reprocess them in-process, at commit.
pytestmark = pytest.mark.usefixtures("tasks_in_process")

PROPS = {
    "plan": {"tier": "pro", "seats": 12, "addons": ["sso", "audit"]},
    "items": [{"sku": "a-1", "qty": 2}, {"sku": "b-2", "qty": 5}],
    "page.section": "billing",
    "count": 7,
    "ratio": "0.5",
    "empty": None,
    "flag": True,
    "name": "Quarterly report",
}


def matches(prop: str, op: str, value=None, properties=PROPS) -> bool:
    condition = {"property": prop, "operator": op}
    if value is not None:
        condition["value"] = value
    return condition_matches(properties, condition)


# --- evaluator --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prop", "value", "expected"),
    [
        ("plan.tier", "pro", True),
        ("plan.tier", "free", False),
        ("plan.seats", 12, True),
        ("plan.seats", 12.0, True),
        ("plan.seats", "12", False),  # a string is not the number
        ("flag", True, True),
        ("flag", 1, False),  # JSON true is not 1
        ("count", True, False),
        ("plan.addons", "sso", True),  # a list equals a value it holds
        ("plan.addons", ["sso", "audit"], True),
        ("items.sku", "b-2", True),  # a name applied to a list looks into every element
        ("items.1.sku", "b-2", True),  # a number indexes the list
        ("items.0.sku", "b-2", False),
        ("items.9.sku", "b-2", False),
        ("page.section", "billing", True),  # literal dotted key (Kissmetrics flattening)
        ("missing.path", "x", False),
    ],
)
def test_equals(prop, value, expected):
    assert matches(prop, "equals", value) is expected


def test_not_equals_is_true_for_a_missing_property():
    assert matches("plan.tier", "not_equals", "free")
    assert not matches("plan.tier", "not_equals", "pro")
    assert matches("nowhere", "not_equals", "pro")
    assert not matches("plan.addons", "not_equals", "sso")


def test_in():
    assert matches("plan.tier", "in", ["team", "pro"])
    assert not matches("plan.tier", "in", ["team", "free"])
    assert matches("count", "in", [1, 7])
    assert matches("items.sku", "in", ["z", "a-1"])
    assert not matches("missing", "in", ["x"])


def test_contains():
    assert matches("name", "contains", "report")
    assert not matches("name", "contains", "Report")  # case-sensitive
    assert matches("plan.addons", "contains", "audit")
    assert not matches("plan.addons", "contains", "saml")
    assert matches("plan", "contains", "tier")  # an object contains a key
    assert not matches("count", "contains", "7")
    assert not matches("missing", "contains", "x")


def test_exists():
    assert matches("plan.tier", "exists")
    assert matches("plan.tier", "exists", True)
    assert not matches("empty", "exists")  # null counts as absent
    assert not matches("nowhere", "exists")
    assert matches("nowhere", "exists", False)
    assert not matches("plan.tier", "exists", False)
    assert matches("items.qty", "exists")


@pytest.mark.parametrize(
    ("prop", "op", "value", "expected"),
    [
        ("count", "gt", 6, True),
        ("count", "gt", 7, False),
        ("count", "gte", 7, True),
        ("count", "gte", 7.5, False),
        ("count", "lt", 8, True),
        ("count", "lt", 7, False),
        ("count", "lte", 7, True),
        ("count", "lte", 6.9, False),
        ("ratio", "lt", 1, True),  # a numeric string compares as a number
        ("plan.seats", "gte", "10", True),
        ("items.qty", "gt", 4, True),  # any element of the list
        ("items.qty", "gt", 5, False),
        ("name", "gt", 1, False),  # not a number: never matches
        ("flag", "gte", 1, False),  # a boolean is not a number
        ("missing", "lt", 100, False),
    ],
)
def test_comparisons(prop, op, value, expected):
    assert matches(prop, op, value) is expected


def test_nested_objects_and_dotted_keys_are_both_found():
    assert matches("a.b.c", "equals", 1, {"a": {"b": {"c": 1}}})
    assert matches("a.b.c", "equals", 1, {"a.b": {"c": 1}})
    assert matches("a.b.c", "equals", 1, {"a": {"b.c": 1}})
    assert matches("a.b.c", "equals", 1, {"a.b.c": 1})
    # The longest literal key that exists wins; one that leads nowhere does not hide the nested path.
    assert matches("a.b", "equals", 2, {"a.b": {"x": 1}, "a": {"b": 2}}) is False
    assert matches("a.b", "equals", 2, {"a.b": None, "a": {"b": 2}}) is False
    assert matches("a.b.x", "equals", 1, {"a.b": {"y": 1}, "a": {"b": {"x": 1}}})


def test_a_compiled_rule_ands_its_event_name_and_conditions():
    rule = CompiledRule(
        rule_id=1,
        feature_id=1,
        event_name="Report Exported",
        conditions=(
            {"property": "plan.tier", "operator": "equals", "value": "pro"},
            {"property": "count", "operator": "gt", "value": 5},
        ),
        amount_property="plan.seats",
    )
    assert rule.matches("Report Exported", PROPS)
    assert not rule.matches("Report Viewed", PROPS)
    assert not rule.matches("Report Exported", {**PROPS, "count": 1})
    assert rule.amount(PROPS) == Decimal(12)
    assert rule.amount({}) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(1, Decimal(1)), (-3, Decimal(-3)), ("2.5", Decimal("2.5")), (" 4 ", Decimal(4)), (1e-10, Decimal(0))],
)
def test_amounts(raw, expected):
    assert parse_amount(raw) == expected


@pytest.mark.parametrize("raw", ["x", None, True, float("nan"), float("inf"), "1e30", [], {}])
def test_non_amounts(raw):
    assert parse_amount(raw) is None


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditions", "field"),
    [
        ("plan.tier = pro", "conditions"),
        (["plan.tier"], "conditions[0]"),
        ([{"operator": "equals", "value": 1}], "conditions[0].property"),
        ([{"property": " ", "operator": "equals", "value": 1}], "conditions[0].property"),
        ([{"property": "x" * 256, "operator": "equals", "value": 1}], "conditions[0].property"),
        ([{"property": "a", "operator": "matches", "value": 1}], "conditions[0].operator"),
        ([{"property": "a", "operator": "in", "value": "pro"}], "conditions[0].value"),
        ([{"property": "a", "operator": "gt", "value": "many"}], "conditions[0].value"),
        ([{"property": "a", "operator": "exists", "value": "yes"}], "conditions[0].value"),
        ([{"property": "a", "operator": "equals"}], "conditions[0].value"),
        (
            [{"property": "a", "operator": "exists"}, {"property": "b", "operator": "contains"}],
            "conditions[1].value",
        ),
    ],
)
def test_invalid_conditions_say_which_field(conditions, field):
    with pytest.raises(InvalidRule) as raised:
        clean_conditions(conditions)
    assert raised.value.field == field


def test_valid_conditions_are_cleaned():
    cleaned = clean_conditions(
        [{"property": " plan.tier ", "operator": "exists"}, {"property": "n", "operator": "lt", "value": 3}]
    )
    assert cleaned == [{"property": "plan.tier", "operator": "exists"}, {"property": "n", "operator": "lt", "value": 3}]


def test_rule_creation_errors(tenant):
    make_feature(tenant.workspace, "reports")

    def create(**fields):
        definition = RuleDefinition(**{"name": "r", "feature_key": "reports", "event_name": "E", **fields})
        with pytest.raises(FeatureError) as raised:
            rule_create(workspace=tenant.workspace, definition=definition)
        return raised.value.code, raised.value.field

    assert create(name=" ") == ("invalid_rule", "name")
    assert create(feature_key="nope") == ("unknown_feature", "feature")
    assert create(event_name=None, conditions=[]) == ("invalid_rule", "conditions")
    assert create(conditions=[{"property": "a", "operator": "near"}]) == ("invalid_rule", "conditions[0].operator")


def test_a_rule_cannot_name_another_workspaces_feature(tenant, other_tenant):
    make_feature(other_tenant.workspace, "reports")
    with pytest.raises(FeatureError) as raised:
        make_rule(tenant.workspace, "reports", event="E")
    assert raised.value.code == "unknown_feature"


# --- rules over stored events (the job runs in-process, at commit) -----------------------


@pytest.fixture
def user(tenant):
    return make_user(tenant.workspace, "u1")


def _create(tenant, django_capture_on_commit_callbacks, feature, **fields):
    with django_capture_on_commit_callbacks(execute=True):
        return make_rule(tenant.workspace, feature, **fields)


def test_a_rule_maps_exactly_the_matching_stored_events_with_their_original_times(
    tenant, user, django_capture_on_commit_callbacks
):
    make_feature(tenant.workspace, "pro-exports")
    events = store_unmapped_events(
        tenant.workspace,
        user,
        [
            ("Report Exported", {"plan": {"tier": "pro"}}),
            ("Report Exported", {"plan": {"tier": "free"}}),
            ("Report Exported", {"plan": {"tier": "pro"}, "delta": 3}),
            ("Report Viewed", {"plan": {"tier": "pro"}}),
            ("Report Exported", {}),
        ],
    )
    rule = _create(
        tenant,
        django_capture_on_commit_callbacks,
        "pro-exports",
        event="Report Exported",
        conditions=[{"property": "plan.tier", "operator": "equals", "value": "pro"}],
    )
    mapped = set(
        Event.objects.filter(workspace=tenant.workspace, status=EventStatus.MAPPED).values_list("id", flat=True)
    )
    assert mapped == {events[0].pk, events[2].pk}
    usages = {u.event_id: u for u in Usage.objects.filter(rule=rule)}
    assert usages[events[0].pk].occurred_at == T0 and usages[events[0].pk].amount == 1
    assert usages[events[2].pk].occurred_at == T0 + timedelta(minutes=2) and usages[events[2].pk].amount == 3
    progress = reprocessing_of(rule)
    # The event-name prefilter runs in SQL: the job scans the four "Report Exported" events.
    assert (progress.status, progress.scanned, progress.mapped) == ("done", 4, 2)


def test_mapped_events_are_not_touched(segment, tenant, django_capture_on_commit_callbacks):
    make_feature(tenant.workspace, "messages")
    make_feature(tenant.workspace, "all-events")
    segment.track("u1", "Message Sent", {"featureId": "messages"}, messageId="direct")
    segment.track("u1", "Message Sent", {}, messageId="loose")
    rule = _create(tenant, django_capture_on_commit_callbacks, "all-events", event="Message Sent")
    assert list(Usage.objects.filter(rule=rule).values_list("event__message_id", flat=True)) == ["loose"]
    assert usage_count(tenant.workspace, "messages") == 1
    assert reprocessing_of(rule).scanned == 1


def test_two_rules_for_two_features_give_an_event_two_usage_rows(segment, tenant, django_capture_on_commit_callbacks):
    make_feature(tenant.workspace, "exports")
    make_feature(tenant.workspace, "pro-activity")
    with django_capture_on_commit_callbacks(execute=True):
        make_rule(tenant.workspace, "exports", event="Report Exported", name="exports")
        make_rule(
            tenant.workspace, "pro-activity", conditions=[{"property": "plan", "operator": "equals", "value": "pro"}]
        )
    response = segment.track("u1", "Report Exported", {"plan": "pro"}, messageId="both")
    assert response.json()["status"] == "mapped"
    event = Event.objects.get(workspace=tenant.workspace, message_id="both")
    assert sorted(Usage.objects.filter(event=event).values_list("feature__key", flat=True)) == [
        "exports",
        "pro-activity",
    ]


def test_two_rules_created_over_a_stored_event_both_count_it(tenant, user, django_capture_on_commit_callbacks):
    make_feature(tenant.workspace, "exports")
    make_feature(tenant.workspace, "pro-activity")
    (event,) = store_unmapped_events(tenant.workspace, user, [("Report Exported", {"plan": "pro"})])
    with django_capture_on_commit_callbacks(execute=True):
        make_rule(tenant.workspace, "exports", event="Report Exported")
        make_rule(
            tenant.workspace, "pro-activity", conditions=[{"property": "plan", "operator": "equals", "value": "pro"}]
        )
    assert sorted(Usage.objects.filter(event=event).values_list("feature__key", flat=True)) == [
        "exports",
        "pro-activity",
    ]


def test_two_rules_for_one_feature_count_an_event_once(segment, tenant, django_capture_on_commit_callbacks):
    make_feature(tenant.workspace, "exports")
    with django_capture_on_commit_callbacks(execute=True):
        first = make_rule(tenant.workspace, "exports", event="Report Exported")
        make_rule(tenant.workspace, "exports", conditions=[{"property": "format", "operator": "exists"}])
    segment.track("u1", "Report Exported", {"format": "csv"})
    assert list(Usage.objects.values_list("rule_id", flat=True)) == [first.pk]  # the oldest rule wins


def test_a_rule_with_mapped_events_is_immutable_but_for_name_and_active(
    segment, tenant, django_capture_on_commit_callbacks
):
    make_feature(tenant.workspace, "exports")
    make_feature(tenant.workspace, "other")
    rule = _create(tenant, django_capture_on_commit_callbacks, "exports", event="Report Exported")
    unused = _create(tenant, django_capture_on_commit_callbacks, "exports", event="Never Sent", name="unused")
    segment.track("u1", "Report Exported")

    with pytest.raises(FeatureError) as raised:
        rule_update(
            workspace=tenant.workspace,
            rule=rule,
            definition=RuleDefinition(name="r", feature_key="other", event_name="Report Exported"),
        )
    assert raised.value.code == "rule_in_use"
    with pytest.raises(FeatureError):
        rule_delete(workspace=tenant.workspace, rule=rule)
    renamed = rule_update(workspace=tenant.workspace, rule=rule, name="Exports (v1)")
    assert renamed.name == "Exports (v1)" and renamed.event_name == "Report Exported"
    assert renamed.feature.key == "exports"

    # A rule that mapped nothing may still be redefined or deleted.
    redefined = rule_update(
        workspace=tenant.workspace,
        rule=unused,
        definition=RuleDefinition(name="unused", feature_key="other", event_name="Sometimes Sent"),
    )
    assert redefined.feature.key == "other"
    rule_delete(workspace=tenant.workspace, rule=redefined)


def test_deactivation_stops_new_matches_and_keeps_history(segment, tenant, django_capture_on_commit_callbacks):
    make_feature(tenant.workspace, "exports")
    rule = _create(tenant, django_capture_on_commit_callbacks, "exports", event="Report Exported")
    segment.track("u1", "Report Exported", messageId="before")
    with django_capture_on_commit_callbacks(execute=True):
        rule_update(workspace=tenant.workspace, rule=rule, active=False)
    response = segment.track("u1", "Report Exported", messageId="while-off")
    assert response.json()["reason"] == UnmappedReason.NO_MATCHING_RULE
    assert list(Usage.objects.values_list("event__message_id", flat=True)) == ["before"]
    assert Event.objects.get(message_id="before", workspace=tenant.workspace).status == EventStatus.MAPPED

    # Re-activating reprocesses what arrived meanwhile.
    with django_capture_on_commit_callbacks(execute=True):
        rule_update(workspace=tenant.workspace, rule=rule, active=True)
    assert sorted(Usage.objects.values_list("event__message_id", flat=True)) == ["before", "while-off"]


def test_an_inactive_rule_starts_no_reprocessing(tenant, user, django_capture_on_commit_callbacks):
    make_feature(tenant.workspace, "exports")
    store_unmapped_events(tenant.workspace, user, [("Report Exported", {})])
    rule = _create(tenant, django_capture_on_commit_callbacks, "exports", event="Report Exported", active=False)
    assert not ReprocessingJob.objects.filter(rule=rule).exists()
    assert usage_count(tenant.workspace, "exports") == 0


def test_amount_property(segment, tenant, user, django_capture_on_commit_callbacks):
    make_feature(tenant.workspace, "storage")
    store_unmapped_events(
        tenant.workspace,
        user,
        [
            ("File Uploaded", {"file": {"megabytes": 2.5}, "delta": 100}),
            ("File Uploaded", {"file": {"megabytes": "oops"}}),
            ("File Uploaded", {}),
        ],
    )
    _create(
        tenant, django_capture_on_commit_callbacks, "storage", event="File Uploaded", amount_property="file.megabytes"
    )
    assert usage_total(tenant.workspace, "storage") == Decimal("2.5")  # delta is not used
    reasons = sorted(
        Event.objects.filter(workspace=tenant.workspace, status=EventStatus.UNMAPPED).values_list(
            "unmapped_reason", flat=True
        )
    )
    assert reasons == ["invalid_delta", "invalid_delta"]
    response = segment.track("u2", "File Uploaded", {"file": {"megabytes": -1}})
    assert response.json()["status"] == "mapped"
    assert usage_total(tenant.workspace, "storage") == Decimal("1.5")


def test_an_event_is_decided_as_if_every_rule_were_tried_in_order():
    # The rule set hands each event name its candidate rules only (those naming it or no
    # name): the decision must be the one trying every rule, oldest first, would make.
    def rule(rule_id, feature_id, name, conditions=(), amount_property=None):
        return CompiledRule(rule_id, feature_id, name, tuple(conditions), amount_property)

    pro = {"property": "plan", "operator": "equals", "value": "pro"}
    rules = (
        rule(1, 10, "Exported", [pro], "pages"),
        rule(2, 20, None, [pro]),
        rule(3, 10, None),  # same feature as rule 1: only the oldest matching counts
        rule(4, 30, "Viewed"),
        rule(5, 20, "Exported"),
        rule(6, 40, ""),
    )
    rule_set = RuleSet(version=1, feature_ids={}, rules=rules)

    def every_rule(name, properties):
        usages = {}
        for r in rules:
            if r.feature_id not in usages and r.matches(name, properties):
                usages[r.feature_id] = (r.feature_id, r.read_amount(properties), r.rule_id)
        return list(usages.values())

    for name in ("Exported", "Viewed", "Other", "", "exported"):
        for properties in ({}, {"plan": "pro", "pages": 3}, {"plan": "free", "delta": 2}):
            assert decide(rule_set, name, properties).usages == every_rule(name, properties), (name, properties)
    assert decide(rule_set, "Exported", {"plan": "pro", "pages": 3}).usages == [
        (10, Decimal(3), 1),
        (20, Decimal(1), 2),
    ]
    assert [r.rule_id for r in rule_set.rules_for("Other")] == [2, 3]


@pytest.mark.parametrize(
    "properties",
    [{}, {"delta": 1}, {"delta": "1"}, {"delta": 2.5}, {"delta": None}, {"delta": "x"}, {"delta": True}, {"other": 3}],
)
def test_the_default_amount_is_the_delta_read_or_1(properties):
    """``read_default_amount`` without a delta is the amount 1 read once (shared by every
    event); with one, it reads it: the same value, or the same error, as reading the delta."""
    expected = properties.get("delta", 1)
    try:
        wanted = read_amount(expected)
    except AmountError as exc:
        with pytest.raises(AmountError) as raised:
            read_default_amount(properties)
        assert raised.value.reason == exc.reason
        return
    got = read_default_amount(properties)
    assert (got, str(got)) == (wanted, str(wanted))
