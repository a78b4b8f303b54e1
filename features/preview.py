"""Rule preview: what a rule would map if it were created now. A selector: it writes nothing.

The answer must equal what creating the rule then maps (``features.reprocessing``): the same
events and the same amounts. Two ways to get it, held equal by
tests/test_rule_preview_equivalence.py:

- **Python** (every database): stream the candidate events in id order, a chunk at a time
  (constant memory), and decide each with ``features.mapping.decide`` on the workspace's
  rules plus the previewed rule, as the reprocessing job will. This is the definition.
- **SQL** (PostgreSQL): the rule's conditions and amount translated to SQL, for the events
  SQL can decide. Each row is classified three ways: decided matched, decided not matched,
  or *unsure* (a shape the translation does not cover: a list on the path, a key with a
  dot in it, a number beyond a float's range, a string that may parse as a number in ways
  only Python knows...). Unsure rows go to the Python path. A condition that has no
  translation at all (``equals`` an object, say) sends the whole rule to Python.

Only events unmapped for ``no_matching_rule`` are decided in SQL: no active rule matched
them, so the previewed rule alone decides them. Events unmapped for another reason (an
invalid amount under an existing rule, say) can be held back by an existing rule's amount,
so they always take the Python path, which decides with every rule. "No active rule
matches a no_matching_rule event" holds once every active rule's reprocessing job is done
(a new, redefined or re-activated rule starts one); while one is not, the stored events
may still match it, and the whole preview is decided in Python.
"""

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Context, Decimal

from django.db import connection

from kana.jobs import JobStatus
from kana.models import Workspace

from .definitions import RuleDefinition, clean_rule_definition
from .mapping import RuleSet, decide, load_rule_set
from .models import Event, EventStatus, ReprocessingJob, UnmappedReason
from .rules import CompiledRule, _number, _parts

SAMPLE_SIZE = 20
# Candidates read per query while looking for the sample (in id order, until 20 hits).
SAMPLE_WINDOW = 20000
# Events decided in Python per query: each row holds one event's properties, so memory is
# bounded by this many payloads whatever the workspace holds.
PYTHON_CHUNK = 2000
# The previewed rule is not saved: it has no id. Any id sorts it last, as the newest rule.
_PREVIEW_RULE_ID = -1
# Sums of amounts up to 10^21 with 9 decimals: more digits than Decimal's default 28.
_SUM = Context(prec=60)


@dataclass
class Period:
    start: datetime
    end: datetime
    matched: int = 0
    amount: Decimal = Decimal(0)


@dataclass
class RulePreview:
    matched_events: int = 0
    amount_total: Decimal = Decimal(0)
    users_affected: int = 0
    by_period: list[Period] = field(default_factory=list)
    sample: list[int] = field(default_factory=list)


def rule_preview(*, workspace: Workspace, definition: RuleDefinition) -> RulePreview:
    """What ``rule_create`` with ``definition`` would map among the stored unmapped events.

    Raises FeatureError as ``rule_create`` does (the name may be blank here).
    """
    if not (definition.name or "").strip():
        definition = RuleDefinition(**{**definition.__dict__, "name": "preview"})
    feature, conditions = clean_rule_definition(workspace, definition)
    if feature.archived_at is not None:
        return RulePreview()  # rules of an archived feature map nothing (load_rule_set skips them)
    rule = CompiledRule(
        rule_id=_PREVIEW_RULE_ID,
        feature_id=feature.pk,
        event_name=(definition.event_name or "").strip() or None,
        conditions=tuple(conditions),
        amount_property=(definition.amount_property or "").strip() or None,
    )
    version = Workspace.objects.values_list("rules_version", flat=True).get(pk=workspace.pk)
    current = load_rule_set(workspace.pk, version)
    rule_set = RuleSet(
        version=current.version,
        feature_ids=current.feature_ids,
        rules=current.rules + (rule,),
        archived_keys=current.archived_keys,
    )
    tally = _Tally()
    translated = None
    if connection.vendor == "postgresql" and not _rules_being_applied(workspace):
        translated = _translate(rule)
    if translated is None:
        _decide_in_python(tally, rule_set, _candidate_chunks(workspace, rule))
    else:
        _decide_in_sql(tally, workspace, rule, rule_set, translated)
    return tally.result()


def _rules_being_applied(workspace: Workspace) -> bool:
    """Whether an active rule's reprocessing job is not done (queued, running or failed)."""
    jobs = ReprocessingJob.objects.for_workspace(workspace).filter(rule__active=True)
    return jobs.exclude(status=JobStatus.DONE).exists()


class _Tally:
    def __init__(self):
        self.matched = 0
        self.amount = Decimal(0)
        self.users: set[int] = set()
        self.extra_user_count = 0  # users counted in SQL, not held here
        self.months: dict[datetime, Period] = {}
        self.sample: list[int] = []

    def add(self, *, month: datetime, matched: int, amount: Decimal) -> None:
        period = self.months.get(month)
        if period is None:
            period = self.months[month] = Period(start=month, end=_next_month(month))
        period.matched += matched
        period.amount = _SUM.add(period.amount, amount)
        self.matched += matched
        self.amount = _SUM.add(self.amount, amount)

    def result(self) -> RulePreview:
        return RulePreview(
            matched_events=self.matched,
            amount_total=self.amount,
            users_affected=len(self.users) + self.extra_user_count,
            by_period=[self.months[m] for m in sorted(self.months)],
            sample=sorted(self.sample)[:SAMPLE_SIZE],
        )


def _month(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def _next_month(month: datetime) -> datetime:
    return datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)


def _candidates(workspace: Workspace, rule: CompiledRule):
    """The events the rule's reprocessing job scans (``reprocessing._candidate_events``)."""
    events = Event.objects.for_workspace(workspace).filter(status=EventStatus.UNMAPPED)
    if rule.event_name is not None:
        events = events.filter(name=rule.event_name)
    return events


def _candidate_chunks(workspace: Workspace, rule: CompiledRule):
    """(id, name, properties, user id, occurred_at) of every candidate, a chunk at a time in
    id order (keyset: each chunk is a short query, memory is one chunk)."""
    events = _candidates(workspace, rule)
    cursor = 0
    while True:
        rows = list(
            events.filter(id__gt=cursor)
            .order_by("id")
            .values_list("id", "name", "payload__properties", "user_id", "occurred_at")[:PYTHON_CHUNK]
        )
        yield rows
        if len(rows) < PYTHON_CHUNK:
            return
        cursor = rows[-1][0]


def _decide_in_python(tally: _Tally, rule_set: RuleSet, chunks) -> None:
    """Decide events with the evaluator, as the rule's reprocessing job will."""
    for rows in chunks:
        for event_id, name, properties, user_id, occurred_at in rows:
            decision = decide(rule_set, name, properties if isinstance(properties, dict) else {})
            if decision.status != EventStatus.MAPPED:
                continue
            amounts = [amount for _f, amount, rule_id in decision.usages if rule_id == _PREVIEW_RULE_ID]
            if not amounts:
                continue
            tally.add(month=_month(occurred_at), matched=1, amount=amounts[0])
            if user_id is not None:
                tally.users.add(user_id)
            if len(tally.sample) < SAMPLE_SIZE:
                tally.sample.append(event_id)


# --- SQL (PostgreSQL) ----------------------------------------------------------------------
#
# Paths and values are written into the SQL as quoted literals (a rule's few values, from a
# validated definition). Each value a rule reads is computed once per row, in layers of
# subqueries fenced with OFFSET 0 (so the planner does not fold them back into copies):
# properties -> the JSON value at each path -> its type and text -> its numeric -> its float.
# Every cast sits behind a CASE that checks the type first: SQL does not promise to
# evaluate AND left to right.

_PROPS = "(CASE WHEN jsonb_typeof(e.payload -> 'properties') = 'object' THEN e.payload -> 'properties' END)"
# A decimal string that float() and numeric read alike (no spaces, underscores, non-ASCII
# digits, inf or nan: those are left to Python).
_PLAIN_NUMBER = r"'^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$'"
_COMPARISONS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_LAYERS = 5


def _literal(text: str) -> str:
    """A quoted SQL string literal; % doubled for the driver's parameter syntax."""
    return "'" + text.replace("'", "''").replace("%", "%%") + "'"


def _path_literal(parts) -> str:
    return "ARRAY[" + ", ".join(_literal(p) for p in parts) + "]::text[]"


class _Columns:
    """Expressions computed once per row, layer by layer; each named by an alias."""

    def __init__(self):
        self.layers: list[dict[str, str]] = [{} for _ in range(_LAYERS)]

    def add(self, layer: int, expression: str) -> str:
        known = self.layers[layer]
        if expression not in known:
            known[expression] = f"c{layer}_{len(known)}"
        return known[expression]

    def rows(self, where: str, *, keep_properties: bool = False) -> str:
        """FROM-able SQL: the candidates with every column, ``r.`` in the outer query.

        The properties (the wide column) are dropped after the paths are read from them,
        unless ``keep_properties``: every layer copies its rows.
        """
        sql = f"SELECT e.id, e.name, e.user_id, e.occurred_at, e.unmapped_reason, {_PROPS} AS p {where} OFFSET 0"
        for layer in range(_LAYERS):
            if layer:
                kept = f"l{layer}.*"
            else:
                kept = "l0.id, l0.name, l0.user_id, l0.occurred_at, l0.unmapped_reason" + (
                    ", l0.p" if keep_properties else ""
                )
            columns = "".join(f", {expr} AS {alias}" for expr, alias in self.layers[layer].items())
            sql = f"SELECT {kept}{columns} FROM ({sql}) l{layer} OFFSET 0"
        return f"({sql}) r"


@dataclass
class _Value:
    """The JSON value at a path (NULL: missing), as columns; ``unsure``: SQL cannot resolve it."""

    json: str
    kind: str
    text: str
    plain_string: str
    numeric: str
    float: str
    unsure: str

    def typed(self, kind: str) -> str:
        return f"({self.kind} = '{kind}')"


def _value(columns: _Columns, json_expression: str, unsure: str) -> _Value:
    v = columns.add(0, json_expression)
    kind = columns.add(1, f"jsonb_typeof({v})")
    text = columns.add(1, f"({v} #>> '{{}}')")
    plain = columns.add(2, f"({kind} = 'string' AND length({text}) <= 60 AND {text} ~ {_PLAIN_NUMBER})")
    # Its value as numeric when a JSON number or a plain numeric string, else NULL.
    numeric = columns.add(
        3, f"(CASE WHEN {kind} = 'number' THEN ({v})::numeric WHEN {plain} THEN ({text})::numeric END)"
    )
    # float(x) as Python reads it: correctly rounded; NULL beyond float8's range (whose
    # input fails there and on underflow: such numbers are left to Python).
    in_range = f"(abs({numeric}) < 1e308 AND ({numeric} = 0 OR abs({numeric}) > 1e-300))"
    as_float = columns.add(4, f"(CASE WHEN {in_range} THEN ({numeric})::float8 END)")
    return _Value(v, kind, text, plain, numeric, as_float, unsure)


def _path(columns: _Columns, parts: tuple[str, ...]) -> _Value:
    """``resolve_path`` in SQL, sure only when every node on the way is an object (or the path
    is missing) and no object on the way holds a dotted key the path could name."""
    unsure = []
    for level in range(len(parts)):
        node = f"(p #> {_path_literal(parts[:level])})" if level else "p"
        unsure.append(f"jsonb_typeof({node}) = 'array'")
        for cut in range(level + 2, len(parts) + 1):
            key = _literal(".".join(parts[level:cut]))
            unsure.append(f"(CASE WHEN jsonb_typeof({node}) = 'object' THEN {node} ? {key} ELSE false END)")
    unsure_column = columns.add(0, "COALESCE(" + " OR ".join(unsure) + ", false)")
    return _value(columns, f"(p #> {_path_literal(parts)})", unsure_column)


def _equal(v: _Value, expected) -> tuple[str, str] | None:
    """``rules._equal(actual, expected)`` for an actual that is no list: (holds, unsure)."""
    if isinstance(expected, (str, bool)):
        # Only a JSON string (boolean) equals a string (boolean): "1", true and 1 all differ.
        return f"COALESCE({v.json} = {_literal(json.dumps(expected))}::jsonb, false)", "false"
    if isinstance(expected, (int, float)):
        number = _number(expected)
        if number is None:
            return None  # Python compares such numbers exactly (``actual == expected``)
        holds = f"COALESCE({v.typed('number')} AND {v.float} = {_literal(repr(number))}::float8, false)"
        unsure = f"COALESCE({v.typed('number')} AND {v.float} IS NULL, false)"
        return holds, unsure
    return None  # objects and lists: left to Python


def _condition(columns: _Columns, condition: dict) -> tuple[str, str] | None:
    """``rules.condition_matches`` in SQL: (holds, unsure), None when it has no translation."""
    op, expected = condition["operator"], condition.get("value")
    v = _path(columns, _parts(condition["property"]))
    present = f"({v.json} IS NOT NULL AND {v.kind} <> 'null')"
    if op == "exists":
        return (present if expected is None or expected is True else f"(NOT {present})"), v.unsure
    # A list at the leaf: _equal/_compare look into every element. Left to Python.
    unsure = [v.unsure, f"COALESCE({v.typed('array')}, false)"]
    if op in ("equals", "not_equals", "in"):
        translated = [_equal(v, option) for option in (expected if op == "in" else [expected])]
        if any(t is None for t in translated):
            return None
        holds = "(" + " OR ".join(["false"] + [t[0] for t in translated]) + ")"
        unsure += [t[1] for t in translated]
        if op == "not_equals":
            holds = f"({v.json} IS NULL OR NOT {holds})"
    elif op == "contains":
        if isinstance(expected, str):
            needle = _literal(expected)
            holds = (
                f"COALESCE(CASE WHEN {v.typed('string')} THEN strpos({v.text}, {needle}) > 0"
                f" WHEN {v.typed('object')} THEN {v.json} ? {needle} ELSE false END, false)"
            )
        else:
            holds = "false"  # a string or object never contains a non-string
    elif op in _COMPARISONS:
        # _number: JSON numbers and numeric strings; anything else compares false.
        holds = f"COALESCE({v.float} {_COMPARISONS[op]} {_literal(repr(_number(expected)))}::float8, false)"
        unsure.append(
            f"COALESCE({v.numeric} IS NOT NULL AND {v.float} IS NULL, false)"
            f" OR COALESCE({v.typed('string')} AND NOT {v.plain_string} AND NOT {_never_a_number(v)}, false)"
        )
    else:
        return None
    return holds, "(" + " OR ".join(f"({u})" for u in unsure) + ")"


def _never_a_number(v: _Value) -> str:
    """Printable ASCII without a digit: never a finite number for float() nor Decimal()."""
    return f"({v.text} ~ '^[ -~]*$' AND {v.text} !~ '[0-9]')"


def _amount(columns: _Columns, rule: CompiledRule) -> tuple[str, str]:
    """``rule.read_amount`` in SQL: (the amount, NULL when invalid; unsure)."""
    if rule.amount_property:
        v = _path(columns, _parts(rule.amount_property))
        when_missing = "NULL"  # a missing amount property is not a number
    else:
        v = _value(columns, "(p -> 'delta')", "false")
        when_missing = "1"  # properties.get("delta", 1)
    # A JSON number with a point is a float in Python, then str(): exact with at most 15
    # significant digits. An integer stays an int: exact. Rounding to 9 decimals is left
    # to Python (numeric rounds half away from zero, Decimal half even), and so are amounts
    # near 10^21, where float rounding decides.
    exact = (
        f"({v.typed('number')} AND ({v.text} !~ '[.]'"
        f" OR length(trim(both '0' from regexp_replace({v.text}, '[^0-9]', '', 'g'))) <= 15))"
        f" OR {v.plain_string}"
    )
    n = v.numeric
    amount = (
        f"(CASE WHEN {v.json} IS NULL THEN {when_missing}"
        f" WHEN ({exact}) AND round({n}, 9) = {n} AND abs({n}) < 1e20 THEN {n} END)"
    )
    invalid = (
        f"COALESCE(({v.json} IS NULL AND {when_missing} IS NULL)"
        f" OR {v.kind} IN ('null', 'boolean', 'object', 'array')"
        f" OR abs({n}) >= 1e21"
        f" OR ({v.typed('string')} AND NOT {v.plain_string} AND {_never_a_number(v)}), false)"
    )
    unsure = f"({v.unsure} OR NOT ({amount} IS NOT NULL OR {invalid}))"
    return amount, unsure


@dataclass
class _Translation:
    columns: _Columns
    matched: str  # every condition holds, and no featureId takes the event elsewhere
    unsure: str  # SQL cannot decide the row
    amount: str  # the amount, NULL when invalid
    no_feature_id: str = "true"  # decide() goes by rules at all (no featureId takes the event)


def _translate(rule: CompiledRule, columns: _Columns | None = None) -> _Translation | None:
    columns = columns or _Columns()
    parts = [_condition(columns, c) for c in rule.conditions]
    if any(p is None for p in parts):
        return None
    # decide() maps an event with a featureId (not null, not "") by it, never by rules.
    feature_id = columns.add(0, "(p -> 'featureId')")
    no_feature_id = f"({feature_id} IS NULL OR {feature_id} IN ('null'::jsonb, '\"\"'::jsonb))"
    matched = " AND ".join([no_feature_id] + [f"({p[0]})" for p in parts])
    amount, amount_unsure = _amount(columns, rule)
    conditions_unsure = " OR ".join(["false"] + [f"({p[1]})" for p in parts])
    # The amount is read only when the conditions hold.
    unsure = f"(({conditions_unsure}) OR (({matched}) AND {amount_unsure}))"
    return _Translation(columns=columns, matched=matched, unsure=unsure, amount=amount, no_feature_id=no_feature_id)


def _decide_in_sql(tally: _Tally, workspace: Workspace, rule: CompiledRule, rule_set: RuleSet, t: _Translation) -> None:
    table = connection.ops.quote_name(Event._meta.db_table)
    where, params = ["e.workspace_id = %s", "e.status = %s"], [workspace.pk, EventStatus.UNMAPPED]
    if rule.event_name is not None:
        where.append("e.name = %s")
        params.append(rule.event_name)
    scan = f"FROM {table} e WHERE {' AND '.join(where)}"
    rows = t.columns.rows(scan)
    sure = f"(r.unmapped_reason = {_literal(UnmappedReason.NO_MATCHING_RULE)} AND NOT {t.unsure})"
    hit = f"(CASE WHEN {sure} AND {t.matched} THEN {t.amount} END)"
    month = "date_trunc('month', occurred_at AT TIME ZONE 'UTC')"
    # One pass: per month, and over all months the distinct users and the rows left to Python.
    query = f"""
        WITH c AS (SELECT r.id, r.user_id, r.occurred_at, {sure} AS sure, {hit} AS amount FROM {rows})
        SELECT {month}, count(amount), sum(amount), count(DISTINCT user_id) FILTER (WHERE amount IS NOT NULL),
               count(*) FILTER (WHERE NOT sure), GROUPING({month})
        FROM c GROUP BY GROUPING SETS (({month}), ())
    """
    left_to_python = 0
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        for start, matched, amount, users, unsure, total_row in cursor.fetchall():
            if total_row:
                tally.extra_user_count, left_to_python = users, unsure
            elif matched:
                tally.add(month=start.replace(tzinfo=UTC), matched=matched, amount=amount)
    if tally.matched:
        tally.sample = _sample(t.columns, scan, hit, params)
    if not left_to_python:
        return
    python = _Tally()
    _decide_in_python(python, rule_set, _unsure_chunks(t.columns, scan, sure, params))
    for start, period in python.months.items():
        tally.add(month=start, matched=period.matched, amount=period.amount)
    tally.sample = sorted(tally.sample + python.sample)[:SAMPLE_SIZE]
    if python.users:
        # A user counted in SQL and found again in Python counts once.
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT count(*) FROM unnest(%s::bigint[]) u(id) WHERE u.id NOT IN"
                f" (SELECT r.user_id FROM {rows} WHERE {hit} IS NOT NULL AND r.user_id IS NOT NULL)",
                [sorted(python.users), *params],
            )
            tally.extra_user_count += cursor.fetchone()[0]


def _windows(columns: _Columns, scan: str, params: list, select: str, *, size: int, keep_properties=False):
    """``select`` over the candidates in id order, a window of ``size`` candidates at a time:
    each window is an index range scan, so a caller that stops early reads little."""
    cursor_id = 0
    with connection.cursor() as cursor:
        while True:
            rows = columns.rows(f"{scan} AND e.id > %s ORDER BY e.id LIMIT {size}", keep_properties=keep_properties)
            cursor.execute(f"SELECT r.id, {select} FROM {rows} ORDER BY r.id", [*params, cursor_id])
            fetched = cursor.fetchall()
            yield fetched
            if len(fetched) < size:
                return
            cursor_id = fetched[-1][0]


def _sample(columns: _Columns, scan: str, hit: str, params: list) -> list[int]:
    """The first SAMPLE_SIZE hits by id: windows in id order until there are enough."""
    sample = []
    for window in _windows(columns, scan, params, f"{hit} IS NOT NULL", size=SAMPLE_WINDOW):
        sample += [event_id for event_id, is_hit in window if is_hit]
        if len(sample) >= SAMPLE_SIZE:
            break
    return sample[:SAMPLE_SIZE]


def _unsure_chunks(columns: _Columns, scan: str, sure: str, params: list):
    """The candidates SQL could not decide (with their properties), a window at a time."""
    select = f"r.name, r.user_id, r.occurred_at, CASE WHEN NOT {sure} THEN COALESCE(r.p, '{{}}'::jsonb) END"
    for window in _windows(columns, scan, params, select, size=PYTHON_CHUNK, keep_properties=True):
        yield [
            (event_id, name, json.loads(props) if isinstance(props, str) else props, user_id, occurred_at)
            for event_id, name, user_id, occurred_at, props in window
            if props is not None
        ]


# --- Reprocessing decided in SQL (features.reprocessing) -----------------------------------


@dataclass
class ChunkDecision:
    """SQL that decides a reprocessing job's candidate rows for its rule, as ``decide`` would.

    ``rows(where)`` is FROM-able SQL over the candidates (``r.`` columns); per row:
    ``amount`` is the usage the rule records (NULL: SQL maps nothing here), ``to_python``
    says SQL could not decide the row (the evaluator decides it). A row is decided in SQL
    only when it is unmapped for ``no_matching_rule``, the translation is sure of it for
    the job's rule *and* for every other active rule, and no other rule matches it: then
    ``decide`` would count it for the job's rule alone, with this amount, or leave it as
    it is. Rows whose user was deleted (``user_id`` NULL) that the rule maps go to Python
    too, which attaches them to their userId's user first.
    """

    columns: _Columns
    amount: str
    to_python: str

    def rows(self, where: str) -> str:
        return self.columns.rows(where)


def decide_chunk_in_sql(rule: CompiledRule, rule_set: RuleSet) -> ChunkDecision | None:
    """The SQL decision of ``rule``'s job over stored events, or None when some active rule's
    conditions have no translation (the job then decides every row in Python)."""
    columns = _Columns()
    own = _translate(rule, columns)
    if own is None:
        return None
    others_miss = []
    for other in rule_set.rules:
        if other.rule_id == rule.rule_id:
            continue
        translated = _translate(other, columns)
        if translated is None:
            return None
        surely_not = f"(NOT COALESCE({translated.unsure}, true) AND NOT COALESCE({translated.matched}, true))"
        if other.event_name is not None:
            surely_not = f"(r.name IS DISTINCT FROM {_literal(other.event_name)} OR {surely_not})"
        others_miss.append(surely_not)
    own_name = "true" if rule.event_name is None else f"(r.name = {_literal(rule.event_name)})"
    sure = " AND ".join(
        [
            f"r.unmapped_reason = {_literal(UnmappedReason.NO_MATCHING_RULE)}",
            f"NOT COALESCE({own.unsure}, true)",
            *others_miss,
        ]
    )
    matched = f"({own_name} AND COALESCE({own.matched}, false))"
    hit = f"(({sure}) AND {matched} AND ({own.amount}) IS NOT NULL)"
    # Matched by no rule, and no featureId: decide() leaves it unmapped for no_matching_rule,
    # as it is stored (an event with a featureId is decided by it: the evaluator's).
    miss = f"(({sure}) AND NOT {matched} AND {own.no_feature_id})"
    return ChunkDecision(
        columns=columns,
        amount=f"(CASE WHEN {hit} THEN {own.amount} END)",
        to_python=f"(NOT ({hit} OR {miss}) OR ({hit} AND r.user_id IS NULL))",
    )
