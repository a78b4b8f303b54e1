"""The OpenAPI schema, the docs page, and schemathesis checking the API against the schema."""

import re
from contextlib import contextmanager

import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.urls import Resolver404, resolve
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kana.wsgi import application

from .api_support import INGEST_PATHS, USER_FIELDS, feature, identify, rule, track

ENDPOINTS = {
    "/api/v1/users",
    "/api/v1/users/{id}",
    "/api/v1/users/merge",
    "/api/v1/users/duplicates",
    "/api/v1/users/{id}/usage",
    "/api/v1/features",
    "/api/v1/features/{id}",
    "/api/v1/rules",
    "/api/v1/rules/{id}",
    "/api/v1/rules/preview",
    "/api/v1/events",
    "/api/v1/events/{id}",
    "/api/v1/events/unmapped/summary",
    "/api/v1/events/{id}/void",
    "/api/v1/audit",
    "/api/v1/workspace",
    "/api/v1/usage",
    "/api/v1/merges",
    "/api/v1/merges/{id}",
    "/api/v1/merges/{id}/undo",
    "/api/v1/users/export",
    "/api/v1/users/import",
    "/api/v1/users/imports/{id}",
    "/api/v1/users/imports/{id}/report",
    "/api/v1/packages",
    "/api/v1/packages/{id}",
    "/api/v1/subscriptions",
    "/api/v1/subscriptions/{id}",
    "/api/v1/entitlements/check",
    "/api/v1/entitlements/usage",
    "/api/v1/entitlements/consume",
    "/api/v1/entitlements/reservations",
    "/api/v1/entitlements/reservations/{id}",
    "/api/v1/entitlements/reservations/{id}/commit",
    "/api/v1/entitlements/reservations/{id}/release",
    "/api/v1/usage/records",
    "/api/v1/webhooks",
    "/api/v1/webhooks/{id}",
    "/api/v1/webhooks/{id}/deliveries",
}
INGEST_ENDPOINTS = set(INGEST_PATHS)


def openapi(client) -> dict:
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200, response.content
    return response.json()


def test_the_schema_describes_every_endpoint(client, db):
    schema = openapi(client)
    assert schema["openapi"].startswith("3.")
    assert ENDPOINTS <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "prv_live_…",
        "description": schema["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    merge = schema["paths"]["/api/v1/users/merge"]["post"]
    assert merge["security"] == [{"ApiKey": []}]
    assert merge["requestBody"]["content"]["application/json"]["examples"], "examples for the docs page"
    assert set(merge["responses"]) >= {"200", "400", "401"}
    user = schema["components"]["schemas"]["User"]["properties"]
    assert set(user) == USER_FIELDS
    rule_schema = schema["components"]["schemas"]["Rule"]["properties"]
    assert rule_schema["conditions"]["items"]["$ref"].endswith("/Condition")
    paged = schema["paths"]["/api/v1/users"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert paged["$ref"].endswith("/PaginatedUserList")


def test_the_docs_page_uses_local_swagger_ui(client, db):
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "/api/schema/" in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and not [a for a in assets if a.startswith(("http://", "https://", "//"))], "nothing from a CDN"
    bundle = next(a for a in assets if a.endswith("swagger-ui-bundle.js"))
    assert client.get(bundle).status_code == 200


def test_unknown_api_paths_answer_json_404(client, db):
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404 and response.json()["code"] == "not_found"


def test_user_routes_leave_the_csv_paths_free():
    for path in ("/api/v1/users/export", "/api/v1/users/import"):
        try:
            match = resolve(path)
        except Resolver404:
            continue  # not routed yet: free for the CSV endpoints
        assert match.url_name not in ("user-detail", "user-list"), f"{path} is taken by the users router"
    assert resolve("/api/v1/users/12").url_name == "user-detail"


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Per operation, valid and invalid requests mixed: 33 operations, under 300 requests in all.
# Generating the requests costs more than answering them; this keeps the run to seconds.
EXAMPLES_PER_OPERATION = 8


@contextmanager
def wsgi_app_inside_the_test_transaction():
    """Serve requests through the real WSGI app without closing the test's connection.

    A WSGI handler closes "old" connections around each request, and a connection inside
    the test's transaction looks old (autocommit off): Django's test client unhooks the same
    signal for the same reason.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield application
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def test_the_api_conforms_to_its_schema(tenant, other_tenant):
    """schemathesis against the live schema, through the WSGI app, with a workspace's key,
    valid and invalid requests: no 5xx, only documented statuses and content types, bodies
    as the schema says.

    (schemathesis' own pytest plugin does not run under pytest 9, so its Python API drives
    hypothesis here, one operation at a time.)
    """
    feature(tenant, "exports")
    rule(tenant, "exports", "Exported")
    for n in range(3):
        identify(tenant, f"u{n}", email="shared@example.com")
        track(tenant, f"u{n}", "Exported", plan={"tier": "pro"})
    identify(other_tenant, "theirs", email="shared@example.com")
    headers = {"Authorization": f"Bearer {tenant.key}"}
    with wsgi_app_inside_the_test_transaction() as app:
        schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} == ENDPOINTS | INGEST_ENDPOINTS
        for operation in operations:
            check_operation(operation, headers)


def check_operation(operation, headers: dict) -> None:
    """Valid and invalid requests for one operation (hypothesis, bounded, reproducible)."""
    valid_or_not = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    @given(case=valid_or_not)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def conforms(case):
        response = case.call(headers=headers)
        case.validate_response(response, checks=CHECKS)

    conforms()
