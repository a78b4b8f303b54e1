"""The OpenAPI schema, the docs page, and schemathesis checking the API against the schema."""

import re

import schemathesis
from django.db import connection
from django.urls import Resolver404, resolve
from schemathesis.checks import CHECKS as ALL_CHECKS
from schemathesis.checks import load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema

from .api_support import INGEST_PATHS, USER_FIELDS, feature, identify, rule, track
from .conftest import _wait_for_request_threads

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


# Every check schemathesis has, by name, so that one it adds later runs here too.
load_all_checks()
NOT_RUN = {
    # Probes whether one identity can read what another created. It needs several identities
    # given as a Web Fuzzing Commons auth document; this run has one key, and a key never
    # sees another workspace's rows is what test_api_tenancy.py asserts, endpoint by endpoint.
    "object_level_authorization": "needs several identities (test_api_tenancy.py covers workspaces)",
}
CHECK_NAMES = [check.__name__ for check in ALL_CHECKS.get_all()]
# Examples per operation and mode in the fuzzing and stateful phases. The examples and
# coverage phases (schema examples, then every boundary, missing or extra value, other
# method, missing header) send what they must regardless, and take most of the run: about
# five minutes for 40 operations on 2 cores shared with other work (fuzzing and stateful: one).
EXAMPLES_PER_OPERATION = 8


def schemathesis_config(api_key: str) -> SchemathesisConfig:
    """What ``schemathesis.toml`` would say: the key, every check, every phase, reproducible."""
    return SchemathesisConfig.from_dict(
        {
            "headers": {"Authorization": f"Bearer {api_key}"},
            "workers": 1,
            "continue-on-failure": True,
            # No state carried between runs (it would also be written into the work tree).
            "cache": {"enabled": False},
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES_PER_OPERATION,
                "deterministic": True,
                "database": "none",
            },
            "checks": {name: {"enabled": name not in NOT_RUN} for name in CHECK_NAMES},
        }
    )


def test_every_schemathesis_check_runs():
    """The brief of issue 15: all of them, by name, except what NOT_RUN explains."""
    assert {
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "positive_data_acceptance",
        "negative_data_rejection",
        "missing_required_header",
        "unsupported_method",
        "allow_header_conformance",
        "use_after_free",
        "ensure_resource_availability",
        "ignored_auth",
    } <= set(CHECK_NAMES) - set(NOT_RUN)
    assert set(NOT_RUN) <= set(CHECK_NAMES), "an exclusion names a check that no longer exists"


def test_the_api_conforms_to_its_schema(transactional_db, live_server, tenant, other_tenant, monkeypatch):
    """schemathesis's own engine, as its CLI runs it, against the live schema over HTTP, with a
    workspace's key and every check: the schema's examples, the coverage phase (boundaries,
    missing and unexpected values, other methods, missing headers), valid and invalid random
    requests, then stateful sequences (create, read, delete). Every operation is held to it,
    including ones added later.
    """
    # The live server's request threads close their database sessions after each request, so
    # none is left open when the test database is dropped (as the browser tests do).
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    feature(tenant, "exports")
    rule(tenant, "exports", "Exported")
    for n in range(3):
        identify(tenant, f"u{n}", email="shared@example.com")
        track(tenant, f"u{n}", "Exported", plan={"tier": "pro"})
    identify(other_tenant, "theirs", email="shared@example.com")
    schema = schemathesis.openapi.from_url(
        f"{live_server.url}/api/schema/?format=json", config=schemathesis_config(tenant.key)
    )
    schema.config.update(base_url=live_server.url)
    assert {result.ok().path for result in schema.get_all_operations()} >= ENDPOINTS | INGEST_ENDPOINTS
    failures, errors, phases = [], [], set()
    for event in from_schema(schema).execute():
        if isinstance(event, events.PhaseFinished):
            phases.add(event.phase.name)
        elif isinstance(event, (events.ScenarioFinished, events.FuzzScenarioFinished)):
            failures += failures_of(event.recorder)
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            errors.append(str(getattr(event, "value", None) or getattr(event, "exception", event)))
        elif isinstance(event, events.EngineFinished):
            failures += [f"after the run: {failure.title}\n{failure.message}" for failure in event.failures]
    _wait_for_request_threads()
    assert not errors, "\n\n".join(errors)
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures)
    assert {"examples", "coverage", "fuzzing", "stateful"} <= {str(phase) for phase in phases}


def failures_of(recorder) -> list[str]:
    """One readable entry per distinct failure: the operation, the check, why, the answer, the curl."""
    found = {}
    for case_id, nodes in recorder.checks.items():
        for node in nodes:
            if node.failure_info is None:
                continue
            failure = node.failure_info.failure
            interaction = recorder.interactions.get(case_id)
            answer = ""
            if interaction is not None and interaction.response is not None:
                answer = f"{interaction.response.status_code} {cut(interaction.response.text or '')}\n"
            found.setdefault(
                (failure.operation, node.name, failure.title),
                f"{failure.operation} [{node.name}] {failure.title}\n{failure.message}\n{answer}"
                + cut(node.failure_info.code_sample),
            )
    return list(found.values())


def cut(text: str, limit: int = 600) -> str:
    # Generated bodies can be huge: each failure stays readable.
    return text if len(text) < limit else text[:limit] + " …"
