"""The consume's JSON body read by ``consume_body`` exactly as ``ConsumeSerializer`` reads it:
the same values (the same Decimal delta, digits and exponent) for every body it takes, and the
serializer's own ValidationError (the same fields, texts and codes) for every one it refuses."""

import random
from decimal import Decimal

from rest_framework.exceptions import ValidationError

from api import entitlement_serializers as s
from api.base import validated
from api.entitlement_requests import consume_body

from .test_entitlement_check_query import TEXTS

DELTAS = [
    0,
    1,
    7,
    12345678901234567890,
    99999999999999999999,
    100000000000000000000,
    123456789012345678901,
    -1,
    -(10**21),
    True,
    False,
    None,
    0.0,
    1.0,
    1.5,
    1e-10,
    0.123456789012,
    1e19,
    1e20,
    1e21,
    -0.0,
    float("nan"),
    float("inf"),
    "1",
    "",
    [1],
    {"n": 1},
    Decimal("1"),
]
NAMES = ["user_id", "feature", "delta", "idempotency_key"]
MISSING = object()


def _read(reader, data):
    try:
        body = reader(data)
    except ValidationError as error:
        return "refused", error.detail, error.get_codes()
    # The Decimal's own digits and exponent, not only its value.
    return "taken", {name: (type(value), str(value)) for name, value in dict(body).items()}


def _assert_same(data):
    assert _read(consume_body, data) == _read(lambda d: validated(s.ConsumeSerializer, d), data), data


BASE = {"user_id": "u1", "feature": "messages", "delta": 1, "idempotency_key": "k1"}


def test_it_reads_each_text_as_the_serializer_does():
    for name in ("user_id", "feature", "idempotency_key"):
        for text in [*TEXTS, "x" * 100 + "y", 1, None, True, ["u1"]]:
            _assert_same({**BASE, name: text})


def test_it_reads_each_delta_as_the_serializer_does():
    for delta in DELTAS:
        _assert_same({**BASE, "delta": delta})


def test_it_reads_bodies_without_some_fields_or_not_objects_as_the_serializer_does():
    for present in range(16):
        _assert_same({name: BASE[name] for n, name in enumerate(NAMES) if present >> n & 1})
    _assert_same({**BASE, "other": "\x00", "group_id": "g"})
    for data in ([], [BASE], "u1", 1, None, True):
        _assert_same(data)


def test_it_reads_mixed_bodies_as_the_serializer_does():
    rng = random.Random(15)
    for _ in range(3000):
        data = {}
        for name in NAMES:
            if rng.random() < 0.85:
                data[name] = rng.choice(DELTAS) if name == "delta" else rng.choice(TEXTS)
        _assert_same(data)


def test_a_plain_body_is_taken_without_the_serializer():
    # What the bench and an SDK send: the serializer's values, the delta rounded to 9 places.
    assert consume_body(BASE) == dict(validated(s.ConsumeSerializer, BASE))
    assert str(consume_body(BASE)["delta"]) == "1.000000000"
    without = {name: value for name, value in BASE.items() if name != "delta"}
    assert consume_body(without)["delta"] is validated(s.ConsumeSerializer, without)["delta"]
