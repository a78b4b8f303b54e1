"""POST /api/v1/rules/preview and the builder's Preview button: what a rule would map if
created now, writing nothing, one workspace's events only, the create endpoint's 400s.

(That the preview equals what creating the rule maps, rule by rule: test_rule_preview_equivalence.py.)
"""

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from features import preview as preview_module
from features.models import Event, MappingRule, ReprocessingJob, Usage
from kana.models import Workspace
from tests.api_support import ApiClient, assert_error
from tests.conftest import requires_postgres
from tests.test_dashboard_pages import _rule_post
from tests.usage_support import T0, make_feature, make_rule, make_user, store_unmapped_events

PRO_EXPORTS = {
    "feature": "exports",
    "event": "Report Exported",
    "conditions": [{"property": "plan.tier", "operator": "equals", "value": "pro"}],
}


@pytest.fixture
def exports(tenant):
    make_feature(tenant.workspace, "exports")
    alice, bob = make_user(tenant.workspace, "alice"), make_user(tenant.workspace, "bob")
    store_unmapped_events(
        tenant.workspace,
        alice,
        [("Report Exported", {"plan": {"tier": "pro"}, "delta": 2})] * 3
        + [("Report Exported", {"plan": {"tier": "free"}})] * 2
        + [("Other", {"plan": {"tier": "pro"}})],
        prefix="a",
    )
    store_unmapped_events(
        tenant.workspace,
        bob,
        [("Report Exported", {"plan": {"tier": "pro"}})] * 2,
        prefix="b",
        start=datetime(2024, 4, 2, tzinfo=UTC),
    )
    return tenant


def test_it_answers_what_the_rule_would_map(exports):
    response = ApiClient(exports).post("rules/preview", PRO_EXPORTS)
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"matched_events", "amount_total", "users_affected", "by_period", "sample"}
    assert (body["matched_events"], body["amount_total"], body["users_affected"]) == (5, 8, 2)
    assert body["by_period"] == [
        {"start": "2024-03-01T00:00:00Z", "end": "2024-04-01T00:00:00Z", "matched": 3, "amount": 6},
        {"start": "2024-04-01T00:00:00Z", "end": "2024-05-01T00:00:00Z", "matched": 2, "amount": 2},
    ]
    pro = Event.objects.for_workspace(exports.workspace).filter(
        name="Report Exported", payload__properties__plan__tier="pro"
    )
    assert body["sample"] == sorted(pro.values_list("id", flat=True))


def test_it_takes_a_name_but_needs_none(exports):
    named = ApiClient(exports).post("rules/preview", {**PRO_EXPORTS, "name": "Pro exports"})
    assert named.json()["matched_events"] == 5


def test_the_sample_is_at_most_twenty_ids(tenant):
    make_feature(tenant.workspace, "exports")
    store_unmapped_events(tenant.workspace, make_user(tenant.workspace, "u"), [("E", {})] * 25)
    body = ApiClient(tenant).post("rules/preview", {"feature": "exports", "event": "E"}).json()
    assert body["matched_events"] == 25 and len(body["sample"]) == 20
    assert body["sample"] == sorted(body["sample"])


def _row_counts(workspace) -> dict:
    return {
        "events": Event.objects.count(),
        "unmapped": Event.objects.filter(status="unmapped").count(),
        "usage": Usage.objects.count(),
        "rules": MappingRule.objects.count(),
        "jobs": ReprocessingJob.objects.count(),
        "rules_version": Workspace.objects.get(pk=workspace.pk).rules_version,
    }


@pytest.mark.parametrize("python_only", [False, True], ids=["as chosen", "python only"])
def test_it_writes_nothing(exports, monkeypatch, python_only):
    if python_only:
        monkeypatch.setattr(preview_module, "_translate", lambda rule: None)
    before = _row_counts(exports.workspace)
    with CaptureQueriesContext(connection) as queries:
        response = ApiClient(exports).post("rules/preview", {**PRO_EXPORTS, "amount_property": "delta"})
    assert response.status_code == 200
    assert _row_counts(exports.workspace) == before
    writes = [q["sql"] for q in queries if q["sql"].lstrip().split()[0].upper() in ("INSERT", "UPDATE", "DELETE")]
    assert writes == []


def test_another_workspaces_events_are_never_counted(exports, other_tenant):
    make_feature(other_tenant.workspace, "exports")
    stranger = make_user(other_tenant.workspace, "alice")
    store_unmapped_events(other_tenant.workspace, stranger, [("Report Exported", {"plan": {"tier": "pro"}})] * 7)
    assert ApiClient(exports).post("rules/preview", PRO_EXPORTS).json()["matched_events"] == 5
    assert ApiClient(other_tenant).post("rules/preview", PRO_EXPORTS).json()["matched_events"] == 7


def test_mapped_events_and_featureid_events_are_not_candidates(tenant):
    make_feature(tenant.workspace, "exports")
    user = make_user(tenant.workspace, "u")
    store_unmapped_events(tenant.workspace, user, [("E", {"featureId": "nope"}), ("E", {"featureId": ""})])
    store_unmapped_events(tenant.workspace, user, [("E", {})], prefix="mapped")
    Event.objects.filter(message_id="mapped-0").update(status="mapped", unmapped_reason="")
    assert ApiClient(tenant).post("rules/preview", {"feature": "exports", "event": "E"}).json()["matched_events"] == 1


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({**PRO_EXPORTS, "feature": "nope"}, 404, "unknown_feature", "feature"),
        ({"feature": "exports"}, 400, "invalid_rule", "conditions"),
        ({"feature": "exports", "event": " "}, 400, "invalid_rule", "conditions"),
        ({**PRO_EXPORTS, "conditions": [{"property": "n", "operator": "gt", "value": "x"}]}, 400, "invalid_rule", None),
        ({**PRO_EXPORTS, "conditions": [{"property": "n", "operator": "near"}]}, 400, "invalid_rule", None),
        ({**PRO_EXPORTS, "conditions": "plan.tier = pro"}, 400, "invalid_rule", "conditions"),
    ],
)
def test_errors_are_the_create_endpoints(exports, body, status, code, field):
    api = ApiClient(exports)
    previewed = assert_error(api.post("rules/preview", body), status, code, field)
    created = assert_error(api.post("rules", {"name": "R", **body}), status, code, field)
    assert (previewed["code"], previewed.get("field")) == (created["code"], created.get("field"))


def test_a_body_without_a_feature_is_a_400_naming_it(exports):
    response = ApiClient(exports).post("rules/preview", {"event": "Report Exported"})
    assert response.status_code == 400
    assert "feature" in response.content.decode()


def test_it_needs_a_key(exports):
    assert ApiClient(None, auth="").post("rules/preview", PRO_EXPORTS).status_code in (401, 403)


@requires_postgres
def test_simple_rules_are_decided_in_sql_alone(exports, monkeypatch):
    """Flat properties and the default amount: no event goes through the evaluator."""

    def no_python(*args, **kwargs):
        raise AssertionError("decided in Python")

    monkeypatch.setattr(preview_module, "_decide_in_python", no_python)
    api = ApiClient(exports)
    assert api.post("rules/preview", PRO_EXPORTS).json()["matched_events"] == 5
    compare = {"feature": "exports", "conditions": [{"property": "delta", "operator": "gte", "value": 2}]}
    assert api.post("rules/preview", compare).json()["matched_events"] == 3


@requires_postgres
def test_while_a_rules_job_is_not_done_the_evaluator_decides(exports, monkeypatch):
    """Stored no_matching_rule events may still match a rule whose job has not run: an older
    rule with an invalid amount for them would hold the event back, as reprocessing will."""
    make_feature(exports.workspace, "pages")
    # Created with its job queued (no worker here): its events are not reprocessed yet.
    make_rule(exports.workspace, "pages", event="Report Exported", amount_property="missing")
    assert ReprocessingJob.objects.for_workspace(exports.workspace).filter(status="queued").exists()
    decided_in_sql = []
    monkeypatch.setattr(preview_module, "_decide_in_sql", lambda *args: decided_in_sql.append(args))
    body = ApiClient(exports).post("rules/preview", PRO_EXPORTS).json()
    assert decided_in_sql == []
    assert body["matched_events"] == 0  # the older rule's missing amount leaves them unmapped


def test_the_schema_documents_it(tenant):
    schema = ApiClient(tenant).client.get("/api/schema/", {"format": "json"}).json()
    operation = schema["paths"]["/api/v1/rules/preview"]["post"]
    assert operation["summary"].startswith("Preview a rule")
    assert "matched_events" in str(operation["responses"]["200"])


# --- The builder's Preview button -----------------------------------------------------------


@pytest.fixture
def builder_events(member_client, tenant):
    make_feature(tenant.workspace, "exports")
    store_unmapped_events(
        tenant.workspace, make_user(tenant.workspace, "u"), [("Report Exported", {"pages": 4})] * 3, start=T0
    )
    return member_client


def test_the_builder_previews_the_typed_rule(builder_events, tenant):
    form = _rule_post("", "Report Exported", "exports", [("pages", "gte", "3")])
    response = builder_events.post("/rules/preview/", form)
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["matched_events"], body["amount_total"], body["users_affected"]) == (3, "3", 1)
    assert body["by_period"] == [{"start": "2024-03-01", "matched": 3, "amount": "3"}]
    assert len(body["sample"]) == 3
    assert MappingRule.objects.count() == 0


def test_the_builder_preview_answers_errors_in_its_words(builder_events):
    response = builder_events.post("/rules/preview/", _rule_post("", "", "exports", []))
    assert response.status_code == 400
    assert response.json()["errors"]


def test_the_builder_preview_is_scoped_to_the_signed_in_workspace(builder_events, other_tenant):
    make_feature(other_tenant.workspace, "exports")
    store_unmapped_events(other_tenant.workspace, make_user(other_tenant.workspace, "x"), [("Report Exported", {})] * 9)
    body = builder_events.post("/rules/preview/", _rule_post("", "Report Exported", "exports", [])).json()
    assert body["matched_events"] == 3


def test_the_builder_page_has_the_preview_button(builder_events):
    page = builder_events.get("/rules/new/").content.decode()
    assert 'id="preview-rule"' in page and 'id="rule-preview"' in page


def test_the_builder_preview_needs_a_sign_in(tenant):
    from django.test import Client

    response = Client().post("/rules/preview/", {})
    assert response.status_code in (302, 403)


@pytest.mark.browser
def test_the_preview_button_shows_what_the_rule_would_map_in_a_browser(page, live_server):
    import re

    from tests.conftest import ADMIN_PASSWORD, make_member, make_tenant

    tenant = make_tenant("Acme")
    make_member(tenant.workspace, "ada")
    make_feature(tenant.workspace, "exports")
    store_unmapped_events(
        tenant.workspace,
        make_user(tenant.workspace, "u"),
        [("Report Exported", {"pages": 4, "delta": 2})] * 3 + [("Report Exported", {"pages": 1})],
    )
    page.goto("/login/")
    page.fill("#id_username", "ada")
    page.fill("#id_password", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/$"))
    page.goto("/rules/new/")
    page.fill("#id_event_name", "Report Exported")
    page.select_option("select[name=feature]", "exports")
    page.fill("input[name=conditions-0-property]", "pages")
    page.select_option("select[name=conditions-0-operator]", "gte")
    page.fill("input[name=conditions-0-value]", "3")
    page.click("#preview-rule")
    page.wait_for_function("document.querySelector('.js-preview-matched').textContent !== ''")
    assert page.inner_text(".js-preview-matched") == "3"
    assert page.inner_text(".js-preview-amount") == "6"
    assert page.inner_text(".js-preview-users") == "1"
    assert page.url.endswith("/rules/new/")  # nothing was saved
    assert MappingRule.objects.count() == 0
