"""REST API: features and mapping rules, with reprocessing progress."""

from features.models import Event, Feature, MappingRule, ReprocessingJob, Usage
from features.tasks import run_reprocessing_job

from .api_support import ApiClient, assert_error, assert_fields, assert_page, feature, identify, rule, track


def run_jobs(tenant):
    """Run the workspace's queued reprocessing jobs here, as a worker would."""
    for job_id in (
        ReprocessingJob.objects.for_workspace(tenant.workspace).filter(status="queued").values_list("pk", flat=True)
    ):
        run_reprocessing_job(job_id=job_id)


# --- Features ------------------------------------------------------------------------------


def test_it_creates_a_feature_keyed_by_its_id(tenant):
    response = ApiClient(tenant).post("features", {"id": "exports", "name": "Exports", "type": "BINARY"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {"id", "name", "type", "archived", "created_at", "unit_label", "unit_label_plural", "metadata"}
    assert body["archived"] is False
    assert (body["id"], body["name"], body["type"]) == ("exports", "Exports", "BINARY")
    assert Feature.objects.for_workspace(tenant.workspace).get(key="exports").type == "BINARY"


def test_a_feature_keeps_its_unit_labels_and_metadata(tenant):
    api = ApiClient(tenant)
    created = api.post(
        "features",
        {"id": "messages", "unit_label": "message", "unit_label_plural": "messages", "metadata": {"tier": 1}},
    ).json()
    assert (created["unit_label"], created["unit_label_plural"], created["metadata"]) == (
        "message",
        "messages",
        {"tier": 1},
    )

    changed = api.patch("features/messages", {"unit_label": "msg", "metadata": {"tier": 2}}).json()

    assert (changed["unit_label"], changed["unit_label_plural"], changed["metadata"]) == (
        "msg",
        "messages",
        {"tier": 2},
    )
    assert api.patch("features/messages", {"metadata": [1]}).status_code == 400


def test_a_new_feature_maps_the_events_that_named_it(tenant):
    track(tenant, "u1", "Exported", featureId="exports", delta=4)
    assert Event.objects.for_workspace(tenant.workspace).get().unmapped_reason == "unknown_feature"
    ApiClient(tenant).post("features", {"id": "exports"})
    run_jobs(tenant)
    assert Usage.objects.for_workspace(tenant.workspace).get().amount == 4


def test_feature_creation_errors(tenant):
    api = ApiClient(tenant)
    api.post("features", {"id": "exports"})
    assert_error(api.post("features", {"id": "exports"}), 409, "feature_exists", "id")
    assert_error(api.post("features", {"id": "has spaces"}), 400, "invalid_feature_id", "id")
    assert_error(api.post("features", {"id": "ok", "type": "METERED"}), 400, "invalid_request", "type")
    assert_error(api.post("features", {"name": "no id"}), 400, "invalid_request", "id")
    assert Feature.objects.for_workspace(tenant.workspace).count() == 1


def test_it_lists_retrieves_updates_and_deletes_features(tenant):
    feature(tenant, "seats")
    feature(tenant, "exports")
    api = ApiClient(tenant)
    assert [f["id"] for f in assert_page(api.get("features").json())] == ["exports", "seats"]
    assert api.get("features/seats").json()["name"] == "Seats"
    updated = api.patch("features/seats", {"name": "Seat licences", "type": "BINARY"})
    assert updated.status_code == 200, updated.content
    assert (updated.json()["name"], updated.json()["type"]) == ("Seat licences", "BINARY")
    assert_error(api.patch("features/seats", {"type": "nope"}), 400, "invalid_request", "type")
    assert api.delete("features/seats").status_code == 204
    assert_error(api.get("features/seats"), 404, "not_found")
    assert_error(api.delete("features/seats"), 404, "not_found")


def test_a_feature_with_rules_cannot_be_deleted(tenant):
    feature(tenant, "exports")
    rule(tenant, "exports", "Exported")
    assert_error(ApiClient(tenant).delete("features/exports"), 409, "feature_in_use", "id")


# --- Rules ---------------------------------------------------------------------------------

RULE = {
    "name": "Pro exports",
    "feature": "exports",
    "event": "Report Exported",
    "conditions": [{"property": "plan.tier", "operator": "equals", "value": "pro"}],
}


def test_it_creates_a_rule_and_reports_its_reprocessing(tenant):
    feature(tenant, "exports")
    identify(tenant, "u1")
    track(tenant, "u1", "Report Exported", plan={"tier": "pro"})
    track(tenant, "u1", "Report Exported", plan={"tier": "free"})
    api = ApiClient(tenant)
    response = api.post("rules", RULE)
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {
        "id",
        "name",
        "feature",
        "event",
        "conditions",
        "amount_property",
        "active",
        "created_at",
        "reprocessing",
    }
    assert (body["feature"], body["event"], body["conditions"]) == ("exports", "Report Exported", RULE["conditions"])
    assert body["amount_property"] is None and body["active"] is True
    assert body["reprocessing"] == {"status": "queued", "scanned": 0, "mapped": 0}
    run_jobs(tenant)
    detail = api.get(f"rules/{body['id']}").json()
    assert detail["reprocessing"] == {"status": "done", "scanned": 2, "mapped": 1}
    [listed] = assert_page(api.get("rules").json())
    assert listed == detail


def test_rule_creation_errors_name_the_field(tenant):
    feature(tenant, "exports")
    api = ApiClient(tenant)
    assert_error(api.post("rules", {**RULE, "feature": "nope"}), 404, "unknown_feature", "feature")
    bad_operator = {**RULE, "conditions": [{"property": "plan", "operator": "like", "value": 1}]}
    assert_error(api.post("rules", bad_operator), 400, "invalid_rule", "conditions[0].operator")
    assert_error(api.post("rules", {**RULE, "conditions": "plan=pro"}), 400, "invalid_rule", "conditions")
    nul = {**RULE, "conditions": [{"property": "plan", "operator": "equals", "value": "a\u0000b"}]}
    assert_error(api.post("rules", nul), 400, "invalid_rule", "conditions[0]")
    assert_error(api.post("rules", {**RULE, "event": None, "conditions": []}), 400, "invalid_rule", "conditions")
    assert_error(api.post("rules", {**RULE, "name": ""}), 400, "invalid_request", "name")
    assert MappingRule.objects.for_workspace(tenant.workspace).count() == 0


def test_an_unused_rule_can_be_redefined(tenant, exports_and_seats):
    created = rule(tenant, "exports", "Exported")
    api = ApiClient(tenant)
    response = api.patch(f"rules/{created.pk}", {"feature": "seats", "event": "Seat Added", "amount_property": "n"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert_fields(body, feature="seats", event="Seat Added", amount_property="n", name="rule")


def test_a_used_rule_only_changes_name_and_active(tenant):
    feature(tenant, "exports")
    used = rule(tenant, "exports", "Exported")
    track(tenant, "u1", "Exported")
    assert Usage.objects.filter(rule=used).exists()
    api = ApiClient(tenant)
    assert_error(api.patch(f"rules/{used.pk}", {"event": "Other"}), 409, "rule_in_use")
    assert_error(
        api.patch(f"rules/{used.pk}", {"name": "x", "conditions": [{"property": "a", "operator": "exists"}]}),
        409,
        "rule_in_use",
    )
    unchanged = api.patch(
        f"rules/{used.pk}", {"name": "Exports", "active": False, "event": "Exported", "amount_property": ""}
    )
    assert unchanged.status_code == 200, "resending the same definition is not a change"
    assert (unchanged.json()["name"], unchanged.json()["active"]) == ("Exports", False)
    assert_error(api.delete(f"rules/{used.pk}"), 409, "rule_in_use")
    used.refresh_from_db()
    assert (used.event_name, used.name, used.active) == ("Exported", "Exports", False)


def test_an_unused_rule_can_be_deleted(tenant):
    feature(tenant, "exports")
    unused = rule(tenant, "exports", "Exported")
    api = ApiClient(tenant)
    assert api.delete(f"rules/{unused.pk}").status_code == 204
    assert_error(api.get(f"rules/{unused.pk}"), 404, "not_found")
    assert_error(api.patch(f"rules/{unused.pk}", {"name": "x"}), 404, "not_found")
