"""REST endpoints /api/v1/users/export and /api/v1/users/import (+ imports/<id>)."""

import csv
import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from users.models import EndUser

from .csv_helpers import csv_bytes, identify

pytestmark = pytest.mark.django_db


@pytest.fixture
def api(tenant):
    return Client(HTTP_AUTHORIZATION=f"Bearer {tenant.key}")


def upload(data: bytes, name="users.csv"):
    return {"file": SimpleUploadedFile(name, data, content_type="text/csv")}


def test_export_streams_the_workspaces_users(api, tenant, other_tenant):
    identify(tenant.workspace, "u1", name="=HYPERLINK()")
    identify(other_tenant.workspace, "theirs")
    response = api.get("/api/v1/users/export", HTTP_ACCEPT="text/csv")
    assert response.status_code == 200
    assert response.streaming and response["Content-Type"] == "text/csv; charset=utf-8"
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [(r["user_id"], r["name"]) for r in rows] == [("u1", "'=HYPERLINK()")]


def test_export_and_import_need_a_key(client, tenant):
    assert client.get("/api/v1/users/export").status_code == 401
    response = client.post("/api/v1/users/import", upload(b"user_id\nu1\n"))
    assert response.status_code == 401 and response.json()["code"] == "not_authenticated"


def test_import_reports_per_row(api, tenant):
    data = csv_bytes([{"user_id": "u1", "email": "ann@example.com"}, {"user_id": "u2", "email": "bad"}])
    response = api.post("/api/v1/users/import?dry_run=true", upload(data))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "done" and body["dry_run"] is True and body["applied"] is False
    assert body["counts"] == {"created": 1, "updated": 0, "merged": 0, "unchanged": 0, "error": 1}
    assert [(r["row"], r["result"], r["code"]) for r in body["rows"]] == [
        (2, "created", None),
        (3, "error", "invalid_email"),
    ]
    assert body["rows"][1]["error"]
    assert not EndUser.objects.exists()

    report = api.get(body["report_url"])
    assert report.status_code == 200
    lines = b"".join(report.streaming_content).decode().splitlines()
    assert lines[0] == "row,result,error,code,kana_id,note" and lines[2].startswith("3,error,")


def test_import_applies(api, tenant):
    response = api.post("/api/v1/users/import", upload(csv_bytes([{"user_id": "u1", "name": "Ann"}])))
    assert response.status_code == 200 and response.json()["applied"] is True
    assert EndUser.objects.get().name == "Ann"


def test_a_bad_file_is_a_400_with_a_code(api, tenant):
    response = api.post("/api/v1/users/import", upload("user_id,name\nu1,José\n".encode("latin-1")))
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "unsupported_encoding" and body["field"] == "file" and "UTF-8" in body["message"]
    response = api.post("/api/v1/users/import", {})
    assert response.status_code == 400 and response.json()["code"] == "missing_file"
    response = api.post("/api/v1/users/import?dry_run=maybe", upload(b"user_id\nu1\n"))
    assert response.status_code == 400 and response.json()["field"] == "dry_run"


def test_a_large_import_is_queued_and_can_be_polled(api, tenant, other_tenant, settings):
    settings.KANA_CSV_INLINE_MAX_ROWS = 2
    data = csv_bytes([{"user_id": f"u{i}"} for i in range(5)])
    response = api.post("/api/v1/users/import", upload(data))
    # Without a broker (the embedded default) the task ran in-process on commit; with one
    # it is queued: either way the answer says where to poll.
    assert response.status_code in (200, 202)
    body = response.json()
    assert body["url"].endswith(f"/api/v1/users/imports/{body['id']}")
    polled = api.get(body["url"])
    assert polled.status_code == 200 and polled.json()["id"] == body["id"]
    other = Client(HTTP_AUTHORIZATION=f"Bearer {other_tenant.key}")
    assert other.get(body["url"]).status_code == 404
