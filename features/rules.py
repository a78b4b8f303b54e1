"""Mapping-rule conditions: validation and evaluation against an event's properties.

This evaluator is the only one: ingest and reprocessing both call it, so an event maps the
same way whenever it is looked at. Paths use dots (``plan.tier``, Kable's notation); a key
that itself contains dots is found too (Kissmetrics flattens ``foo.bar.prop``); a number
indexes a list (``items.0.sku``) and a name applied to a list looks into every element.
"""

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

OPERATORS = ("equals", "not_equals", "in", "contains", "exists", "gt", "gte", "lt", "lte")
_MISSING = object()
# Usage amounts are stored with 9 decimals and 21 integer digits (DecimalField(30, 9)).
_MAX_AMOUNT = Decimal(10) ** 21
_AMOUNT_QUANTUM = Decimal("0.000000001")


class InvalidRule(ValueError):
    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message, self.field = message, field


def resolve_path(data: Any, path: str) -> Any:
    """The value at a dot path, a list of values when the path crosses a list, or _MISSING."""
    return _resolve(data, _parts(path)) if path else _MISSING


@lru_cache(maxsize=4096)
def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


@lru_cache(maxsize=4096)
def _cuts(parts: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(literal key, rest of the path) pairs, longest literal key first.

    Computed once per path: reprocessing evaluates the same few paths millions of times.
    """
    return tuple((".".join(parts[:cut]), parts[cut:]) for cut in range(len(parts), 0, -1))


def _resolve(node: Any, parts: tuple[str, ...]) -> Any:
    if not parts:
        return node
    if isinstance(node, dict):
        # Longest literal key first, so {"a.b": 1} is found by "a.b" as well as {"a": {"b": 1}}.
        for key, rest in _cuts(parts):
            if key in node:
                found = _resolve(node[key], rest)
                if found is not _MISSING:
                    return found
        return _MISSING
    if isinstance(node, list):
        head = parts[0]
        if head.isdigit():
            index = int(head)
            return _resolve(node[index], parts[1:]) if index < len(node) else _MISSING
        values = [v for v in (_resolve(item, parts) for item in node) if v is not _MISSING]
        return values if values else _MISSING
    return _MISSING


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _equal(actual: Any, expected: Any) -> bool:
    if isinstance(actual, list):
        return any(_equal(item, expected) for item in actual) or actual == expected
    if isinstance(actual, (str, bool)) or isinstance(expected, (str, bool)):
        return type(actual) is type(expected) and actual == expected  # "1", true and 1 all differ
    a, e = _number(actual), _number(expected)
    if a is not None and e is not None:
        return a == e
    return actual == expected


def _compare(actual: Any, expected: Any, op: str) -> bool:
    if isinstance(actual, list):
        return any(_compare(item, expected, op) for item in actual)
    a, e = _number(actual), _number(expected)
    if a is None or e is None:
        return False
    if op == "gt":
        return a > e
    if op == "gte":
        return a >= e
    if op == "lt":
        return a < e
    return a <= e


def condition_matches(properties: dict, condition: dict) -> bool:
    op, expected = condition["operator"], condition.get("value")
    actual = resolve_path(properties, condition["property"])
    if op == "exists":
        present = actual is not _MISSING and actual is not None
        return present if expected is None or expected is True else not present
    if actual is _MISSING:
        return op == "not_equals"
    if op == "equals":
        return _equal(actual, expected)
    if op == "not_equals":
        return not _equal(actual, expected)
    if op == "in":
        return any(_equal(actual, option) for option in expected)
    if op == "contains":
        if isinstance(actual, str):
            return isinstance(expected, str) and expected in actual
        if isinstance(actual, list):
            return any(_equal(item, expected) for item in actual)
        if isinstance(actual, dict):
            return isinstance(expected, str) and expected in actual
        return False
    return _compare(actual, expected, op)


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_contains_nul(item) for item in value)
    if isinstance(value, dict):
        return any(_contains_nul(key) or _contains_nul(item) for key, item in value.items())
    return False


def clean_conditions(conditions: Any) -> list[dict]:
    """Validate rule conditions as an admin or API client sent them; raise InvalidRule."""
    if conditions is None:
        return []
    if not isinstance(conditions, list):
        raise InvalidRule("conditions must be a list", "conditions")
    cleaned = []
    for index, condition in enumerate(conditions):
        where = f"conditions[{index}]"
        if not isinstance(condition, dict):
            raise InvalidRule(f"{where} must be an object", where)
        if _contains_nul(condition):
            # PostgreSQL's jsonb cannot store U+0000: refuse it here rather than fail on save.
            raise InvalidRule(f"{where} must not contain NUL characters", where)
        path = condition.get("property")
        if not isinstance(path, str) or not path.strip() or len(path) > 255:
            raise InvalidRule(f"{where}.property must be a dot path such as plan.tier", f"{where}.property")
        op = condition.get("operator")
        if op not in OPERATORS:
            raise InvalidRule(f"{where}.operator must be one of {', '.join(OPERATORS)}", f"{where}.operator")
        value = condition.get("value")
        if op == "in" and not isinstance(value, list):
            raise InvalidRule(f"{where}.value must be a list for 'in'", f"{where}.value")
        if op in ("gt", "gte", "lt", "lte") and _number(value) is None:
            raise InvalidRule(f"{where}.value must be a number for '{op}'", f"{where}.value")
        if op == "exists" and value not in (None, True, False):
            raise InvalidRule(f"{where}.value must be true, false or absent for 'exists'", f"{where}.value")
        if op in ("equals", "not_equals", "contains") and value is None:
            raise InvalidRule(f"{where}.value is required for '{op}'", f"{where}.value")
        entry = {"property": path.strip(), "operator": op}
        if value is not None:
            entry["value"] = value
        cleaned.append(entry)
    return cleaned


def parse_amount(value: Any) -> Decimal | None:
    """A usage amount: any finite number (or numeric string); None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not isinstance(value, (int, float, str)):
        return None
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    if not amount.is_finite() or abs(amount) >= _MAX_AMOUNT:
        return None
    return amount.quantize(_AMOUNT_QUANTUM)


@dataclass(frozen=True)
class CompiledRule:
    rule_id: int
    feature_id: int
    event_name: str | None
    conditions: tuple[dict, ...]
    amount_property: str | None

    def matches(self, event_name: str, properties: dict) -> bool:
        if self.event_name is not None and self.event_name != event_name:
            return False
        return all(condition_matches(properties, c) for c in self.conditions)

    def amount(self, properties: dict) -> Decimal | None:
        if self.amount_property:
            value = resolve_path(properties, self.amount_property)
            return None if value is _MISSING else parse_amount(value)
        return default_amount(properties)


def default_amount(properties: dict) -> Decimal | None:
    """``properties.delta``, 1 when absent."""
    return parse_amount(properties.get("delta", 1))
