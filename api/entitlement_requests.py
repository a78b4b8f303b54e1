"""The entitlement check and consume as both of their routes answer them: the DRF views
(``api.entitlement_views``) and the lean WSGI front (``api.lean``).

Each takes the request's parameters as plain data, validates them with the serializer the
OpenAPI schema describes (a bad one raises DRF's ValidationError: 400 naming it), makes the
one ``entitlements`` call and returns the answer's data, so the two routes cannot drift apart
in what they accept or answer."""

from entitlements import access

from . import entitlement_serializers as s
from .base import validated, validated_query


def check_answer(workspace, params: dict) -> dict:
    """``GET /api/v1/entitlements/check``: ``params`` is the query string as a dict."""
    query = validated_query(s.CheckQuerySerializer, params)
    entitlement = access.check(
        workspace,
        feature_key=query["feature"],
        user_id=query.get("user_id"),
        group_id=query.get("group_id"),
        delta=query.get("delta", 1),
    )
    return entitlement.as_dict()


def consume_answer(workspace, data) -> dict:
    """``POST /api/v1/entitlements/consume``: ``data`` is the parsed JSON body."""
    body = validated(s.ConsumeSerializer, data)
    answer, _ = access.consume(
        workspace,
        user_id=body["user_id"],
        feature_key=body["feature"],
        delta=body["delta"],
        idempotency_key=body["idempotency_key"],
    )
    return answer
