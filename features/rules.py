"""Mapping-rule conditions: validation and evaluation against an event's properties.

This evaluator is the only one: ingest and reprocessing both call it, so an event maps the
same way whenever it is looked at. Paths use dots (``plan.tier``, Kable's notation); a key
that itself contains dots is found too (Kissmetrics flattens ``foo.bar.prop``); a number
indexes a list (``items.0.sku``) and a name applied to a list looks into every element.
"""

import math
import sys
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

OPERATORS = ("equals", "not_equals", "in", "contains", "exists", "gt", "gte", "lt", "lte")
_MISSING = object()
# Usage amounts are stored with 9 decimals and 21 integer digits (DecimalField(30, 9)).
_MAX_AMOUNT = Decimal(10) ** 21
_MAX_FLOAT_AMOUNT = 1e21
_AMOUNT_QUANTUM = Decimal("0.000000001")
# Beyond a float's range a number is "not a finite number", as in the rules' comparisons
# (and as the JSON number 1e400 is): such an amount is NOT_A_NUMBER, not OUT_OF_RANGE.
_FLOAT_MAX = Decimal(sys.float_info.max)
# Rounding to 9 decimals needs up to 30 significant digits: the default context (28) raised
# InvalidOperation for amounts from 1e19 up. 40 digits leave room for any amount that fits.
_AMOUNT_CONTEXT = Context(prec=40)
# Why an amount cannot be recorded (the event's unmapped reason, see UnmappedReason).
NOT_A_NUMBER = "invalid_delta"
OUT_OF_RANGE = "invalid_amount"


class AmountError(ValueError):
    """An amount that cannot be recorded: ``reason`` is NOT_A_NUMBER or OUT_OF_RANGE."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
        if head.isdecimal():  # not isdigit(): int("²") raises
            index = int(head)
            return _resolve(node[index], parts[1:]) if index < len(node) else _MISSING
        values = [v for v in (_resolve(item, parts) for item in node) if v is not _MISSING]
        return values if values else _MISSING
    return _MISSING


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # beyond a float's range (~1.8e308): not a comparable number
            return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
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
    """A usage amount: any finite number (or numeric string) that fits the usage column;
    None when it is not one. Never raises."""
    try:
        return read_amount(value)
    except AmountError:
        return None


def read_amount(value: Any) -> Decimal:
    """A usage amount rounded to 9 decimals; AmountError says why when there is none.

    NOT_A_NUMBER: not a finite number (nor one beyond a float's range); OUT_OF_RANGE: a number the usage column
    (numeric(30, 9)) cannot hold, i.e. 10^21 or more in absolute value once rounded.
    """
    if isinstance(value, bool) or value is None:
        raise AmountError(NOT_A_NUMBER)
    if isinstance(value, float) and not math.isfinite(value):
        raise AmountError(NOT_A_NUMBER)
    if not isinstance(value, (int, float, str)):
        raise AmountError(NOT_A_NUMBER)
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):  # ValueError: int beyond Python's digit limit
        raise AmountError(NOT_A_NUMBER) from None
    if not amount.is_finite():
        raise AmountError(NOT_A_NUMBER)
    # copy_abs and comparisons are exact and use no context: abs() overflowed on "1e999999999".
    if amount.copy_abs() > _FLOAT_MAX:
        raise AmountError(NOT_A_NUMBER)
    if amount.copy_abs() >= _MAX_AMOUNT:
        raise AmountError(OUT_OF_RANGE)
    amount = amount.quantize(_AMOUNT_QUANTUM, context=_AMOUNT_CONTEXT)
    # Rounded up to 10^21; or within a float's step of it: SQLite keeps numerics as floats,
    # and Django could not fit 1e21 read back into the column's 30 digits.
    if amount.copy_abs() >= _MAX_AMOUNT or abs(float(amount)) >= _MAX_FLOAT_AMOUNT:
        raise AmountError(OUT_OF_RANGE)
    return amount


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
        """The amount this rule records for the event, None when there is none."""
        try:
            return self.read_amount(properties)
        except AmountError:
            return None

    def read_amount(self, properties: dict) -> Decimal:
        """``amount``, raising AmountError (which says why) when there is none."""
        if self.amount_property:
            value = resolve_path(properties, self.amount_property)
            if value is _MISSING:
                raise AmountError(NOT_A_NUMBER)
            return read_amount(value)
        return read_default_amount(properties)


def default_amount(properties: dict) -> Decimal | None:
    """``properties.delta``, 1 when absent."""
    return parse_amount(properties.get("delta", 1))


# The amount of an event without a delta (most events), read once: Decimals are immutable,
# so every usage row may share it.
_ONE = read_amount(1)


def read_default_amount(properties: dict) -> Decimal:
    """``default_amount``, raising AmountError (which says why) when there is none."""
    delta = properties.get("delta", _MISSING)
    # Reading the 1 anew was a few µs per mapped event.
    return _ONE if delta is _MISSING else read_amount(delta)
