"""Issue 15: requests that violate the OpenAPI schema are refused, and errors are JSON.

schemathesis (negative data) found requests the API accepted though the schema forbids them:
empty query parameters documented as non-empty strings (DRF reads a query string like an HTML
form, where an empty optional field is absent), body values of another JSON type (DRF turns
0 into "0", "12" into 12, 1 into true); and a 401 JSON body labelled ``text/csv``.
"""

import pytest

from features.models import Feature, MappingRule
from tests.api_support import ApiClient, assert_error, feature, identify


@pytest.mark.parametrize(
    "path,param",
    [
        ("users", "user_id"),
        ("users", "email"),
        ("users", "search"),
        ("users", "flag"),
        ("events", "user_id"),
        ("events", "event"),
        ("events", "status"),
        ("usage", "user_id"),
        ("usage", "feature"),
        ("usage", "start"),
        ("usage", "end"),
        ("merges", "user"),
        ("events/unmapped/summary", "event"),
    ],
)
def test_an_empty_query_parameter_is_refused(tenant, path, param):
    identify(tenant, "u1")
    assert_error(ApiClient(tenant).get(path, {param: ""}), 400, "invalid_request", param)


def test_filters_still_work(tenant):
    identify(tenant, "u1", email="a@example.com")
    identify(tenant, "u2")
    api = ApiClient(tenant)
    assert [u["user_id"] for u in api.get("users", {"user_id": "u1"}).json()["results"]] == ["u1"]
    assert api.get("users", {"email": "A@example.com "}).json()["count"] == 1
    assert api.get("users").json()["count"] == 2


@pytest.mark.parametrize(
    "body,field",
    [
        ({"id": "f1", "name": 0}, "name"),
        ({"id": 5}, "id"),
        ({"id": "f1", "name": ["x"]}, "name"),
        ({"id": True}, "id"),
    ],
)
def test_a_feature_with_a_value_of_another_type_is_refused(tenant, body, field):
    assert_error(ApiClient(tenant).post("features", body), 400, "invalid_request", field)
    assert not Feature.objects.exists()


def test_a_feature_update_with_a_value_of_another_type_is_refused(tenant):
    feature(tenant, "f1")
    assert_error(ApiClient(tenant).patch("features/f1", {"name": 0}), 400, "invalid_request", "name")
    assert Feature.objects.get(key="f1").name == "F1"


@pytest.mark.parametrize(
    "change,field",
    [
        ({"name": 0}, "name"),
        ({"feature": 1}, "feature"),
        ({"event": 5}, "event"),
        ({"amount_property": 1}, "amount_property"),
        ({"active": 1}, "active"),
        ({"active": "true"}, "active"),
    ],
)
def test_a_rule_with_a_value_of_another_type_is_refused(tenant, change, field):
    feature(tenant, "f1")
    body = {"name": "r", "feature": "f1", "event": "E", **change}
    assert_error(ApiClient(tenant).post("rules", body), 400, "invalid_request", field)
    assert not MappingRule.objects.exists()


@pytest.mark.parametrize(
    "body,field", [({"name": 0}, "name"), ({"email": 5}, "email"), ({"billing_id": 1}, "billing_id")]
)
def test_a_user_update_with_a_value_of_another_type_is_refused(tenant, body, field):
    user = identify(tenant, "u1", name="Ann")
    assert_error(ApiClient(tenant).patch(f"users/{user.pk}", body), 400, "invalid_request", field)
    user.refresh_from_db()
    assert user.name == "Ann"


def test_a_merge_names_users_by_integer_ids_only(tenant):
    a, b = identify(tenant, "a"), identify(tenant, "b")
    api = ApiClient(tenant)
    assert_error(api.post("users/merge", {"user_ids": [str(a.pk), str(b.pk)]}), 400, "invalid_request", "user_ids")
    assert_error(api.post("users/merge", {"user_ids": [a.pk, b.pk], "survivor": str(b.pk)}), 400, "invalid_request")
    assert_error(api.post("users/merge", {"user_ids": [a.pk, True]}), 400, "invalid_request", "user_ids")
    assert api.post("users/merge", {"user_ids": [a.pk, b.pk]}).status_code == 200


@pytest.mark.parametrize(
    "path,query,headers,status",
    [
        ("users/export", {}, {"HTTP_ACCEPT": "text/csv"}, 401),
        ("users/export", {"format": "csv"}, {}, 401),
        ("users/imports/700/report", {"format": "csv"}, {"auth": True}, 404),
        ("users/imports/700/report", {}, {"HTTP_ACCEPT": "text/csv", "auth": True}, 404),
    ],
)
def test_csv_endpoints_answer_errors_as_json(tenant, path, query, headers, status):
    api = ApiClient(tenant, auth="" if not headers.pop("auth", False) else None)
    response = api.client.get(f"/api/v1/{path}", query, **api._headers(), **headers)
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["code"]


def test_the_export_itself_is_still_csv(tenant):
    identify(tenant, "u1")
    api = ApiClient(tenant)
    for query, headers in (({}, {"HTTP_ACCEPT": "text/csv"}), ({"format": "csv"}, {}), ({}, {})):
        response = api.client.get("/api/v1/users/export", query, **api._headers(), **headers)
        assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")


def test_an_import_needs_a_true_or_false_dry_run(tenant):
    from django.core.files.uploadedfile import SimpleUploadedFile

    api = ApiClient(tenant)
    upload = SimpleUploadedFile("u.csv", b"user_id,email\nu1,a@example.com\n", content_type="text/csv")
    response = api.client.post("/api/v1/users/import?dry_run=", {"file": upload}, **api._headers())
    assert_error(response, 400, "invalid_dry_run", "dry_run")
