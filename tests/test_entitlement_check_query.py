"""The check's query string read by ``check_query`` exactly as ``CheckQuerySerializer`` reads it:
the same dict (the same Decimal delta, digits and exponent) for every query it takes, and the
serializer's own ValidationError (the same fields, texts and codes) for every one it refuses."""

import random

import pytest
from rest_framework.exceptions import ValidationError

from api import entitlement_serializers as s
from api.base import validated_query
from api.entitlement_requests import check_query

TEXTS = [
    "u1",
    "messages",
    "a b",
    " u1",
    "u1 ",
    "   ",
    "",
    "\t",
    "u\t1",
    "u1\n",
    "u\x001",
    "\x00",
    "u\x1f",
    "u\x7f",
    "é",
    "user-é",
    "\ud800",
    "u\udfff",
    "\u00a0u1",
    "u1\u3000",
    "Ω" * 100,
    "x" * 99,
    "x" * 100,
    "x" * 101,
    "x" * 255,
    "x" * 256,
    " " + "x" * 255,
    "x" * 255 + " ",
    "%",
    "'; DROP TABLE x; --",
    "O'Brien",
    "back\\slash",
    "0",
    "1",
    "-",
]
DELTAS = [
    "",
    " ",
    "0",
    "1",
    "007",
    "12345678901234567890",
    "99999999999999999999",
    "100000000000000000000",
    "123456789012345678901",
    "1.5",
    "0.0000000001",
    "1e3",
    "1E-3",
    "-1",
    "+1",
    " 1",
    "1 ",
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "inf",
    "1,5",
    "٣",
    "²",
    "1_000",
    "0x10",
    "abc",
    "1" * 1001,
]
NAMES = ["user_id", "group_id", "feature", "delta"]


def _read(reader, params):
    try:
        query = reader(params)
    except ValidationError as error:
        return "refused", error.detail, error.get_codes()
    # The Decimal's own digits and exponent, not only its value.
    return "taken", {name: (type(value), str(value)) for name, value in query.items()}


def _assert_same(params):
    assert _read(check_query, params) == _read(lambda p: validated_query(s.CheckQuerySerializer, p), params), params


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("name", ["user_id", "group_id", "feature"])
def test_it_reads_each_text_as_the_serializer_does(name, text):
    base = {"user_id": "u1", "feature": "messages", "delta": "1"}
    _assert_same({**base, name: text})
    if name != "feature":
        _assert_same({"feature": "messages", name: text})


@pytest.mark.parametrize("delta", DELTAS)
def test_it_reads_each_delta_as_the_serializer_does(delta):
    _assert_same({"user_id": "u1", "feature": "messages", "delta": delta})


def test_it_reads_queries_without_some_parameters_as_the_serializer_does():
    values = dict(zip(NAMES, ["u1", "g1", "messages", "2"], strict=True))
    for present in range(16):
        params = {name: values[name] for n, name in enumerate(NAMES) if present >> n & 1}
        _assert_same(params)
    _assert_same({"feature": "messages", "other": "\x00", "format_like": "x" * 1000})


def test_it_reads_mixed_queries_as_the_serializer_does():
    rng = random.Random(13)
    for _ in range(3000):
        params = {}
        for name in NAMES:
            if rng.random() < 0.8:
                params[name] = rng.choice(DELTAS if name == "delta" and rng.random() < 0.7 else TEXTS)
        _assert_same(params)


def test_a_plain_query_is_taken_without_the_serializer():
    # What the bench and an SDK send: the answer is the serializer's, rounded delta included.
    query = check_query({"user_id": "u42", "feature": "messages", "delta": "1"})
    assert query == validated_query(s.CheckQuerySerializer, {"user_id": "u42", "feature": "messages", "delta": "1"})
    assert str(query["delta"]) == "1.000000000"
    assert str(check_query({"group_id": "g", "feature": "f"})["delta"]) == "1"
