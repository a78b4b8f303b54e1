"""Helpers for the entitlements tests: packages and subscriptions through the REST API."""

from .api_support import ApiClient, identify
from .conftest import SegmentClient, Tenant


def package(tenant: Tenant, key: str, *features: dict, is_addon: bool = False, status: str = "published") -> dict:
    """A package through the API; ``features``: {"feature", "limit", "overage_enabled", "reset_period"}."""
    response = ApiClient(tenant).post(
        "packages", {"id": key, "is_addon": is_addon, "status": status, "features": list(features)}
    )
    assert response.status_code == 201, response.content
    return response.json()


def subscribe(tenant: Tenant, package_key: str, *, user_id=None, group_id=None, **fields) -> dict:
    subject = {"user_id": user_id} if user_id is not None else {"group_id": group_id}
    response = ApiClient(tenant).post("subscriptions", {**subject, "package": package_key, **fields})
    assert response.status_code == 201, response.content
    return response.json()


def join_group(tenant: Tenant, user_id: str, group_id: str) -> None:
    response = SegmentClient(tenant).post("/v1/group", {"userId": user_id, "groupId": group_id, "traits": {}})
    assert response.status_code == 200, response.content


def check(tenant: Tenant, feature: str, *, user_id=None, group_id=None, delta=None) -> dict:
    params = {"feature": feature, **({"user_id": user_id} if user_id else {"group_id": group_id})}
    if delta is not None:
        params["delta"] = delta
    response = ApiClient(tenant).get("entitlements/check", params)
    assert response.status_code == 200, response.content
    return response.json()


def consume(tenant: Tenant, user_id: str, feature: str, key: str, delta=1, client: ApiClient | None = None):
    return (client or ApiClient(tenant)).post(
        "entitlements/consume", {"user_id": user_id, "feature": feature, "delta": delta, "idempotency_key": key}
    )


def user_with_package(tenant: Tenant, user_id: str, limit, *, feature: str = "messages", **offer) -> None:
    """``user_id`` exists and holds a published base package giving ``limit`` of ``feature``."""
    identify(tenant, user_id)
    package(tenant, f"plan-{user_id}", {"feature": feature, "limit": limit, **offer})
    subscribe(tenant, f"plan-{user_id}", user_id=user_id)
