"""The CSV pages: streamed export, upload -> dry-run report -> apply, workspace scoping."""

import csv
import io

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.conftest import SegmentClient
from tests.csv_helpers import csv_bytes
from users.models import EndUser, ImportJob

HEADER = ("kana_id", "user_id", "name", "email", "billing_id", "billing_provider", "created_at", "flags")


@pytest.fixture(autouse=True)
def _own_media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path


def _dashboard_copies(workspace) -> list[str]:
    """Files the dashboard keeps between a dry run and its apply."""
    try:
        files = default_storage.listdir(f"imports/{workspace.pk}")[1]
    except FileNotFoundError:
        return []
    return [name for name in files if name.startswith("dashboard-")]


def _upload(client, data: bytes, name: str = "users.csv"):
    return client.post("/csv/import/", {"file": SimpleUploadedFile(name, data, content_type="text/csv")})


def _snapshot(workspace) -> list[tuple]:
    return list(
        EndUser.objects.for_workspace(workspace)
        .order_by("pk")
        .values_list("pk", "user_id", "name", "email", "billing_id")
    )


def test_export_streams_every_user_of_the_workspace(member_client, segment, other_tenant):
    segment.identify("u1", {"email": "a@example.com", "name": "=HYPERLINK(1)"})
    segment.identify("u2", {"email": "b@example.com", "billingUserId": "cus_B"})
    SegmentClient(other_tenant).identify("theirs", {"email": "t@example.com"})
    response = member_client.get("/csv/export/")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="kana-users-acme-')
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode("utf-8"))))
    assert tuple(rows[0]) == HEADER
    assert [row[1] for row in rows[1:]] == ["u1", "u2"]
    assert rows[1][2] == "'=HYPERLINK(1)"  # neutralised for spreadsheets


def test_a_row_error_is_reported_and_nothing_changes(member_client, segment, tenant):
    segment.identify("u1", {"email": "a@example.com", "name": "Ann"})
    before = _snapshot(tenant.workspace)
    data = csv_bytes(
        [
            {"user_id": "u1", "name": "Ann Changed"},
            {"user_id": "u9", "email": "not-an-email"},
            {"email": "new@example.com", "name": "New"},
        ]
    )
    response = _upload(member_client, data, "people.csv")
    job = ImportJob.objects.get(workspace=tenant.workspace)
    assert response.status_code == 302 and response["Location"] == f"/csv/imports/{job.pk}/"
    page = member_client.get(response["Location"])
    text = page.content.decode()
    assert "1 row with errors: nothing was changed" in text
    error_rows = [row for row in page.context["report"]["rows"] if row["result"] == "error"]
    assert [row["row"] for row in error_rows] == [3]  # the file's line number, header is line 1
    assert 'data-row="3"' in text and "not-an-email" in text
    assert "apply-import" not in text
    assert _snapshot(tenant.workspace) == before
    assert member_client.post(f"/csv/imports/{job.pk}/apply/").status_code == 302
    assert _snapshot(tenant.workspace) == before
    assert ImportJob.objects.filter(workspace=tenant.workspace).count() == 1
    assert _dashboard_copies(tenant.workspace) == []  # a file that cannot be applied is not kept


def test_a_clean_dry_run_applies_exactly_once(member_client, segment, tenant, member):
    segment.identify("u1", {"email": "a@example.com", "name": "Ann"})
    data = csv_bytes([{"user_id": "u1", "name": "Ann Changed"}, {"email": "new@example.com", "name": "New"}])
    dry = member_client.get(_upload(member_client, data)["Location"])
    assert dry.context["report"]["counts"] == {"created": 1, "updated": 1, "merged": 0, "unchanged": 0, "error": 0}
    assert dry.context["can_apply"] and "apply-import" in dry.content.decode()
    assert len(_dashboard_copies(tenant.workspace)) == 1
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 1

    dry_job = dry.context["job"]
    applied = member_client.post(f"/csv/imports/{dry_job.pk}/apply/")
    job = ImportJob.objects.get(workspace=tenant.workspace, dry_run=False)
    assert applied["Location"] == f"/csv/imports/{job.pk}/"
    assert job.applied and job.actor == f"user:{member.username}"
    assert "Applied: the changes below are saved." in member_client.get(applied["Location"]).content.decode()
    names = set(EndUser.objects.for_workspace(tenant.workspace).values_list("name", flat=True))
    assert names == {"Ann Changed", "New"}

    again = member_client.post(f"/csv/imports/{dry_job.pk}/apply/", follow=True)
    assert "applied already or is no longer kept" in again.content.decode()
    assert ImportJob.objects.filter(workspace=tenant.workspace, dry_run=False).count() == 1
    assert _dashboard_copies(tenant.workspace) == []
    report = member_client.get(f"/csv/imports/{job.pk}/report/")
    assert report.status_code == 200
    assert b"row,result,error,code,kana_id,note" in b"".join(report.streaming_content)
    progress = member_client.get(f"/csv/imports/{job.pk}/progress/").json()
    assert progress["status"] == "done" and progress["finished"] and progress["rows_processed"] == 2


def test_a_file_that_is_not_utf8_is_refused_clearly(member_client, tenant):
    data = "user_id,name\nu1,Zoë\n".encode("utf-16")
    response = _upload(member_client, data)
    assert response.status_code == 400
    assert "UTF-8" in response.content.decode()
    assert not ImportJob.objects.exists()
    assert _upload(member_client, b"").status_code == 400


def test_imports_of_another_workspace_are_not_found(member_client, other_tenant):
    from users.csv_import import import_users_csv

    theirs = import_users_csv(
        workspace=other_tenant.workspace, file=io.BytesIO(csv_bytes([{"user_id": "x"}])), dry_run=True, actor="b"
    )
    for url in (
        f"/csv/imports/{theirs.pk}/",
        f"/csv/imports/{theirs.pk}/progress/",
        f"/csv/imports/{theirs.pk}/report/",
    ):
        assert member_client.get(url).status_code == 404, url
    assert member_client.post(f"/csv/imports/{theirs.pk}/apply/").status_code == 404
    assert member_client.get("/csv/").context["imports"] == []
