"""The entitlement check and consume as both of their routes answer them: the DRF views
(``api.entitlement_views``) and the lean WSGI front (``api.lean``).

Each takes the request's parameters as plain data, validates them with the serializer the
OpenAPI schema describes (a bad one raises DRF's ValidationError: 400 naming it), makes the
one ``entitlements`` call and returns the answer's data, so the two routes cannot drift apart
in what they accept or answer."""

from decimal import Context, Decimal

from entitlements import access

from . import entitlement_serializers as s
from .base import validated, validated_query

# The check's text parameters and their max_length in ``CheckQuerySerializer``.
_CHECK_TEXTS = (("user_id", 255), ("group_id", 255), ("feature", 100))
# A delta of at most this many digits (no sign, no point) is below MAX_AMOUNT (1e20).
_PLAIN_DELTA_DIGITS = 20
_DELTA_PLACES = Decimal("1E-9")  # QueryAmountField's 9 decimal places
_DELTA_CONTEXT = Context(prec=60)  # as the field's: 20 digits and 9 places need 29
_DELTA_DEFAULT = s.CheckQuerySerializer._declared_fields["delta"].default


def check_query(params: dict) -> dict:
    """``validated_query(CheckQuerySerializer, params)``, the same dict, without DRF's field
    machinery (≈ 8 % of a check's CPU: docs/performance-history.md, "Round 13: s6lat") when every
    value is one the serializer takes as it is: a text of printable ASCII, not empty, no
    leading or trailing space, within its max_length (nothing to trim, no NUL or surrogate),
    and a delta of plain digits. Any other query, and every refusal, is the serializer's own:
    the same 400s naming the same fields with the same texts.
    tests/test_entitlement_check_query.py holds the two equal."""
    query = {}
    for name, max_length in _CHECK_TEXTS:
        value = params.get(name)
        if value is None:
            continue
        if not (type(value) is str and 0 < len(value) <= max_length and value.isascii() and value.isprintable()):
            return validated_query(s.CheckQuerySerializer, params)
        if value[0] == " " or value[-1] == " ":
            return validated_query(s.CheckQuerySerializer, params)
        query[name] = value
    delta = params.get("delta")
    if "feature" not in query or not (
        delta is None
        or (type(delta) is str and 0 < len(delta) <= _PLAIN_DELTA_DIGITS and delta.isascii() and delta.isdigit())
    ):
        return validated_query(s.CheckQuerySerializer, params)
    # As the field: absent, its default as it is; given, rounded to 9 places (exact here).
    query["delta"] = _DELTA_DEFAULT if delta is None else Decimal(delta).quantize(_DELTA_PLACES, context=_DELTA_CONTEXT)
    return query


def check_answer(workspace, params: dict) -> dict:
    """``GET /api/v1/entitlements/check``: ``params`` is the query string as a dict."""
    query = check_query(params)
    entitlement = access.check(
        workspace,
        feature_key=query["feature"],
        user_id=query.get("user_id"),
        group_id=query.get("group_id"),
        delta=query.get("delta", 1),
    )
    return entitlement.as_dict()


# The consume's text fields and their max_length in ``ConsumeSerializer``.
_CONSUME_TEXTS = (("user_id", 255), ("feature", 100), ("idempotency_key", 100))
_PLAIN_DELTA_LIMIT = 10**_PLAIN_DELTA_DIGITS  # an int below it is below MAX_AMOUNT
_CONSUME_DELTA_DEFAULT = s.ConsumeSerializer._declared_fields["delta"].default


def consume_body(data) -> dict:
    """``validated(ConsumeSerializer, data)``'s values, without DRF's field machinery (≈ 6 % of
    a consume's app CPU, docs/performance-history.md, "Round 15: s7cpu"), for a body whose every value
    the serializer takes as it is: the three texts as ``check_query`` takes a text, and a delta
    absent or a JSON integer (not a bool) from 0 to 20 digits. Any other body, and every
    refusal, is the serializer's own. tests/test_entitlement_consume_body.py holds the two equal."""
    if type(data) is not dict:
        return validated(s.ConsumeSerializer, data)
    body = {}
    for name, max_length in _CONSUME_TEXTS:
        value = data.get(name)
        if not (
            type(value) is str
            and 0 < len(value) <= max_length
            and value.isascii()
            and value.isprintable()
            and value[0] != " "
            and value[-1] != " "
        ):
            return validated(s.ConsumeSerializer, data)
        body[name] = value
    if "delta" not in data:
        body["delta"] = _CONSUME_DELTA_DEFAULT
        return body
    delta = data["delta"]
    if type(delta) is not int or not 0 <= delta < _PLAIN_DELTA_LIMIT:
        return validated(s.ConsumeSerializer, data)
    # As the field: rounded to 9 places (exact here: at most 29 digits in its 30).
    body["delta"] = Decimal(delta).quantize(_DELTA_PLACES, context=_DELTA_CONTEXT)
    return body


def consume_answer(workspace, data) -> dict:
    """``POST /api/v1/entitlements/consume``: ``data`` is the parsed JSON body."""
    body = consume_body(data)
    answer, _ = access.consume(
        workspace,
        user_id=body["user_id"],
        feature_key=body["feature"],
        delta=body["delta"],
        idempotency_key=body["idempotency_key"],
    )
    return answer
