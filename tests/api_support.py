"""Helpers for the REST API tests: a client that sends a workspace's key, and data builders
that go through the real ingest endpoints and services (never straight into tables)."""

import json
from datetime import UTC, datetime

from features.models import FeatureType
from features.services import RuleDefinition, feature_create, rule_create
from users.models import EndUser
from users.profile import validated_changes
from users.services import upsert_user_by_email

from .conftest import SegmentClient, Tenant, api_client

# The fields of a user as the API answers it.
USER_FIELDS = {
    "id",
    "user_id",
    "user_ids",
    "name",
    "email",
    "billing_id",
    "billing_provider",
    "created_at",
    "updated_at",
    "flags",
    "audiences",
}
# Segment's endpoints (plain Django views, described by segment_ingest/schema.py).
INGEST_PATHS = (
    "/segment/events",
    "/v1/track",
    "/v1/identify",
    "/v1/page",
    "/v1/screen",
    "/v1/group",
    "/v1/alias",
    "/v1/batch",
    "/v1/import",
)


class ApiClient:
    """Talks to ``/api/v1/`` with ``Authorization: Bearer <the tenant's key>``."""

    def __init__(self, tenant: Tenant | None, *, auth: str | None = None):
        self.tenant = tenant
        self.client = api_client()
        self.auth = auth if auth is not None else f"Bearer {tenant.key}"

    def _headers(self):
        return {"HTTP_AUTHORIZATION": self.auth} if self.auth else {}

    def get(self, path: str, params: dict | None = None):
        return self.client.get(f"/api/v1/{path}", params or {}, **self._headers())

    def post(self, path: str, body=None):
        return self.client.post(
            f"/api/v1/{path}", json.dumps(body or {}), content_type="application/json", **self._headers()
        )

    def patch(self, path: str, body=None):
        return self.client.patch(
            f"/api/v1/{path}", json.dumps(body or {}), content_type="application/json", **self._headers()
        )

    def delete(self, path: str):
        return self.client.delete(f"/api/v1/{path}", **self._headers())


def at(day: int, hour: int = 12) -> str:
    return datetime(2025, 1, day, hour, tzinfo=UTC).isoformat()


def identify(tenant: Tenant, user_id: str, **traits) -> EndUser:
    response = SegmentClient(tenant).identify(user_id, traits)
    assert response.status_code == 200, response.content
    return EndUser.objects.for_workspace(tenant.workspace).get(identities__external_id=user_id)


def bare_user(tenant: Tenant, email: str) -> EndUser:
    changes, problems = validated_changes(email=email)
    assert not problems
    return upsert_user_by_email(workspace=tenant.workspace, changes=changes, occurred_at=datetime.now(UTC)).user


def track(tenant: Tenant, user_id: str, event: str, **properties):
    timestamp = properties.pop("_at", at(10))
    response = SegmentClient(tenant).track(user_id, event, properties, timestamp=timestamp)
    assert response.status_code == 200, response.content
    return response.json()


def feature(tenant: Tenant, key: str, type: str = FeatureType.CONSUMABLE):
    return feature_create(workspace=tenant.workspace, key=key, name=key.title(), type=type)


def rule(tenant: Tenant, feature_key: str, event: str, name: str = "rule", **fields):
    return rule_create(
        workspace=tenant.workspace,
        definition=RuleDefinition(name=name, feature_key=feature_key, event_name=event, **fields),
    )


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["code"] == code, body
    assert body["message"]
    if field is not None:
        assert body.get("field") == field, body
    return body


def assert_fields(body: dict, **expected) -> None:
    """The answer's fields named in ``expected`` have those values."""
    assert {name: body[name] for name in expected} == expected, body


def assert_page(body: dict) -> list:
    assert set(body) == {"count", "next", "previous", "results"}, body
    return body["results"]
