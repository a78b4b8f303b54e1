"""Rule preview equals what creating the rule then maps: same events, same amounts.

One corpus of awkward events (nested paths, dotted keys, lists, numbers as strings, huge
numbers, invalid amounts, featureIds, an existing rule's invalid amounts) and many rules:
- a table of operators × value types, each previewed, then created and reprocessed, and the
  preview compared with the usage the rule recorded (PostgreSQL: the SQL path with its
  Python fallback; SQLite: the Python path);
- random rules (hypothesis), previewed with the SQL path and with the Python path alone
  (the evaluator, as reprocessing runs it), which must agree.
"""

import random
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, localcontext

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features import preview as preview_module
from features.models import Event, Usage
from features.preview import rule_preview
from features.services import RuleDefinition
from tests.conftest import is_postgres
from tests.usage_support import make_feature, make_rule, make_user, store_unmapped_events

START = datetime(2024, 1, 20, 12, 0, tzinfo=UTC)

NUMBERS = [5, 5.0, 7, -3, 10.5, 0, 0.1, 1e-7, 10**400, 2**53 + 1, 1.23456789012345678]
STRINGS = ["5", " 5", "5_0", "1e3", "abc", "", "pro", "PRO", "１２", "-0.5", "1e400", "nan", "inf", "é pro é"]
OTHERS = [True, False, None, [1, 7], ["pro", "x"], {"k": 1}, {"tier": "pro"}, [{"tier": "pro"}, {"tier": "free"}]]
DELTAS = [
    2,
    "3",
    "2.5",
    0.1,
    "x",
    None,
    True,
    10**21,
    5e-10,
    "0.0000000005",
    1.23456789012345678,
    "1.0000000001",
    99999999999999999999,
    "-4",
    [2],
    {"a": 1},
    1.5e300,
    "  7 ",
]
MISSING = object()


def _maybe(rng, choices, missing_weight=0.3):
    return MISSING if rng.random() < missing_weight else rng.choice(choices)


def corpus(seed: int = 7, size: int = 260) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    values = NUMBERS + STRINGS + OTHERS
    specs = []
    for index in range(size):
        props = {}
        shape = index % 6
        tier = _maybe(rng, values)
        if tier is not MISSING:
            if shape == 0:
                props["plan"] = {"tier": tier}
            elif shape == 1:
                props["plan.tier"] = tier  # Kissmetrics' flattened key
            elif shape == 2:
                props["plan"] = [{"tier": tier}, {"tier": "free"}]
            elif shape == 3:
                props["plan"] = tier
            elif shape == 4:
                props["plan"] = {"tier": {"name": tier}}
            else:
                props["plan"] = {"tier": tier, "tier.x": 1}
        for key in ("n", "s", "x"):
            value = _maybe(rng, values)
            if value is not MISSING:
                props[key] = value
        delta = _maybe(rng, DELTAS, 0.4)
        if delta is not MISSING:
            props["delta"] = delta
        cost = _maybe(rng, DELTAS, 0.3)
        if cost is not MISSING:
            props["meta"] = {"cost": cost}
        if rng.random() < 0.1:
            props["featureId"] = rng.choice(["", None, "nope", 0])
        if rng.random() < 0.1:
            props["items"] = [{"sku": rng.choice(["a", "b"])}, {"sku": "c"}]
        specs.append((rng.choice(["A", "A", "B", "C"]), props))
    return specs


def store_corpus(workspace, *, other_workspace=None):
    users = [make_user(workspace, f"u{i}") for i in range(4)]
    for index, (name, props) in enumerate(corpus()):
        store_unmapped_events(
            workspace, users[index % 4], [(name, props)], prefix=f"c{index}", start=START + timedelta(days=index / 3)
        )
    if other_workspace is not None:  # never counted
        stranger = make_user(other_workspace, "u0")
        store_unmapped_events(other_workspace, stranger, corpus(seed=8, size=60), prefix="o")
    make_feature(workspace, "target")
    make_feature(workspace, "costs")


RULES = [
    # (event, conditions, amount_property)
    ("A", [], None),
    (None, [{"property": "plan.tier", "operator": "equals", "value": "pro"}], None),
    (None, [{"property": "plan.tier", "operator": "equals", "value": 5}], None),
    (None, [{"property": "plan.tier", "operator": "equals", "value": "5"}], None),
    (None, [{"property": "plan.tier", "operator": "equals", "value": True}], None),
    (None, [{"property": "plan.tier", "operator": "equals", "value": 0.1}], None),
    (None, [{"property": "plan.tier.name", "operator": "equals", "value": "pro"}], None),
    (None, [{"property": "n", "operator": "equals", "value": 5}], "meta.cost"),
    (None, [{"property": "n", "operator": "equals", "value": 2**53}], None),
    (None, [{"property": "n", "operator": "equals", "value": 10**400}], None),
    (None, [{"property": "n", "operator": "equals", "value": [1, 7]}], None),
    ("A", [{"property": "s", "operator": "not_equals", "value": "pro"}], None),
    (None, [{"property": "n", "operator": "not_equals", "value": 5}], "meta.cost"),
    (None, [{"property": "x", "operator": "in", "value": ["pro", 5, True]}], None),
    (None, [{"property": "x", "operator": "in", "value": []}], None),
    (None, [{"property": "x", "operator": "in", "value": [{"k": 1}]}], None),
    (None, [{"property": "s", "operator": "contains", "value": "pro"}], None),
    (None, [{"property": "s", "operator": "contains", "value": ""}], None),
    (None, [{"property": "s", "operator": "contains", "value": "k"}], "delta"),
    (None, [{"property": "x", "operator": "contains", "value": 7}], None),
    (None, [{"property": "plan", "operator": "contains", "value": "tier"}], None),
    (None, [{"property": "n", "operator": "gt", "value": 4}], None),
    (None, [{"property": "n", "operator": "gte", "value": "5"}], "meta.cost"),
    (None, [{"property": "s", "operator": "lt", "value": 6}], None),
    (None, [{"property": "x", "operator": "lte", "value": -0.5}], None),
    (None, [{"property": "plan.tier", "operator": "gt", "value": 0}], None),
    (None, [{"property": "n", "operator": "exists"}], None),
    (None, [{"property": "plan.tier", "operator": "exists", "value": False}], "delta"),
    (None, [{"property": "items.sku", "operator": "equals", "value": "a"}], None),
    (None, [{"property": "items.0.sku", "operator": "equals", "value": "a"}], None),
    ("B", [{"property": "s", "operator": "exists"}, {"property": "n", "operator": "lt", "value": 100}], "meta.cost"),
    ("C", [], "meta.cost"),
    ("C", [{"property": "n", "operator": "exists"}], None),
    (None, [{"property": "meta.cost", "operator": "gte", "value": 0}], "meta.cost"),
]


def _existing_rule(workspace, django_capture_on_commit_callbacks):
    """An older rule whose amount is invalid for some events: those stay unmapped (invalid_delta)."""
    with django_capture_on_commit_callbacks(execute=True):
        make_rule(
            workspace,
            "costs",
            event="C",
            conditions=[{"property": "s", "operator": "exists"}],
            amount_property="meta.cost",
            name="costs",
        )


def _definition(event, conditions, amount_property) -> RuleDefinition:
    return RuleDefinition(
        name="", feature_key="target", event_name=event, conditions=conditions, amount_property=amount_property
    )


def _months(moments_and_amounts) -> list[tuple[datetime, int, Decimal]]:
    months: dict[datetime, list] = {}
    for moment, amount in moments_and_amounts:
        moment = moment.astimezone(UTC)
        start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        entry = months.setdefault(start, [0, Decimal(0)])
        entry[0] += 1
        entry[1] += amount
    return [(start, count, total) for start, (count, total) in sorted(months.items())]


def _summary(preview):
    with localcontext(Context(prec=60)):
        return _plain_summary(preview)


def _plain_summary(preview):
    return (
        preview.matched_events,
        Decimal(preview.amount_total).normalize(),
        preview.users_affected,
        [(p.start, p.matched, Decimal(p.amount).normalize()) for p in preview.by_period],
        preview.sample,
    )


@pytest.mark.usefixtures("tasks_in_process")
@pytest.mark.parametrize(("event", "conditions", "amount_property"), RULES)
def test_preview_equals_what_creating_the_rule_maps(
    tenant, other_tenant, django_capture_on_commit_callbacks, monkeypatch, event, conditions, amount_property
):
    # Small windows: the sample and the Python fallback walk many of them.
    monkeypatch.setattr(preview_module, "PYTHON_CHUNK", 7)
    monkeypatch.setattr(preview_module, "SAMPLE_WINDOW", 5)
    store_corpus(tenant.workspace, other_workspace=other_tenant.workspace)
    _existing_rule(tenant.workspace, django_capture_on_commit_callbacks)
    preview = rule_preview(workspace=tenant.workspace, definition=_definition(event, conditions, amount_property))

    with django_capture_on_commit_callbacks(execute=True):
        rule = make_rule(
            tenant.workspace, "target", event=event, conditions=conditions, amount_property=amount_property
        )
    usage = list(Usage.objects.filter(rule=rule).values_list("event_id", "amount").order_by("event_id"))
    events = dict(Event.objects.filter(id__in=[e for e, _a in usage]).values_list("id", "occurred_at"))
    users = set(Event.objects.filter(id__in=[e for e, _a in usage]).values_list("user_id", flat=True))
    with localcontext(Context(prec=60)):
        expected = _expected(usage, events, users)
    got = _summary(preview)
    if not is_postgres():
        # SQLite keeps usage amounts as floats (99999999999999999999 reads back as 1e20): the
        # ledger, not the preview, is inexact there. Compare amounts as floats.
        got, expected = _as_floats(got), _as_floats(expected)
    assert got == expected


def _as_floats(summary):
    count, total, users, periods, sample = summary
    return count, float(total), users, [(s, c, float(a)) for s, c, a in periods], sample


def _expected(usage, events, users):
    return (
        len(usage),
        sum((a for _e, a in usage), Decimal(0)).normalize(),
        len(users),
        [(s, c, t.normalize()) for s, c, t in _months((events[e], a) for e, a in usage)],
        [e for e, _a in usage][:20],
    )


# --- Random rules: the SQL path (with its fallback) equals the evaluator alone ---------------

PATHS = ["plan.tier", "plan", "n", "s", "x", "plan.tier.name", "items.sku", "meta.cost", "delta", "missing.path"]
VALUES = st.sampled_from(NUMBERS[:-2] + STRINGS + [True, False, 2**53, 1e300, -0.0])


@st.composite
def conditions(draw):
    path = draw(st.sampled_from(PATHS))
    op = draw(st.sampled_from(["equals", "not_equals", "in", "contains", "exists", "gt", "gte", "lt", "lte"]))
    if op == "exists":
        return {"property": path, "operator": op, **draw(st.sampled_from([{}, {"value": True}, {"value": False}]))}
    if op == "in":
        return {"property": path, "operator": op, "value": draw(st.lists(VALUES, max_size=3))}
    if op in ("gt", "gte", "lt", "lte"):
        return {"property": path, "operator": op, "value": draw(st.sampled_from([0, 4, 5, 5.5, -1, "5", 1e20]))}
    return {"property": path, "operator": op, "value": draw(VALUES)}


@pytest.mark.usefixtures("tasks_in_process")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    event=st.sampled_from([None, "A", "B", "C"]),
    rule_conditions=st.lists(conditions(), min_size=1, max_size=3),
    amount_property=st.sampled_from([None, "meta.cost", "delta", "n", "plan.tier"]),
)
def test_random_rules_preview_as_the_evaluator_decides(
    corpus_workspace, monkeypatch, event, rule_conditions, amount_property
):
    definition = _definition(event, rule_conditions, amount_property)
    chosen = rule_preview(workspace=corpus_workspace, definition=definition)
    with monkeypatch.context() as patched:
        patched.setattr(preview_module, "_translate", lambda rule: None)
        python_only = rule_preview(workspace=corpus_workspace, definition=definition)
    assert _summary(chosen) == _summary(python_only)


@pytest.fixture
def corpus_workspace(tenant, other_tenant, django_capture_on_commit_callbacks, tasks_in_process):
    store_corpus(tenant.workspace, other_workspace=other_tenant.workspace)
    _existing_rule(tenant.workspace, django_capture_on_commit_callbacks)
    # Its job done, so the SQL path is the one compared with the evaluator (on PostgreSQL).
    assert not preview_module._rules_being_applied(tenant.workspace)
    return tenant.workspace
