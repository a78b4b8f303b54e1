"""The CSV import report names the fields each updated or merged row changes, so a dry run
says what applying would do to each user, not only that it would "update" them."""

import pytest

from users.models import EndUser

from .csv_helpers import T0, bare, csv_bytes, identify, run_import

pytestmark = pytest.mark.django_db


def changes_by_row(job) -> dict[int, tuple[str, list[str]]]:
    return {row["row"]: (row["result"], row["changes"]) for row in job.sample}


@pytest.mark.parametrize("row_by_row", [False, True], ids=["set-based", "per-row services"])
def test_a_dry_run_lists_the_fields_each_row_changes(tenant, row_by_row):
    workspace = tenant.workspace
    identify(workspace, "u1", name="Ann", email="ann@example.com", billing_id="cus_ann", at=T0)
    identify(workspace, "u2", name="Bob", email="bob@example.com", at=T0)
    carl = bare(workspace, email="carl@example.com", at=T0)
    rows = [
        {"user_id": "u1", "name": "Annie", "billing_id": "cus_ann"},  # same billing id: only the name
        {"user_id": "u2", "email": "BOB@example.com", "billing_id": "cus_bob"},
        {"user_id": "u3", "name": "New"},
        {"kana_id": str(carl.pk), "name": "Carl", "email": "carl@example.com"},
        {"user_id": "u1", "name": "Twice"},  # the same user again: an error, no changes
    ]
    job = run_import(workspace, csv_bytes(rows), dry_run=True, row_by_row=row_by_row)

    assert changes_by_row(job) == {
        2: ("updated", ["name"]),
        3: ("updated", ["email", "billing_id"]),
        4: ("created", []),
        5: ("updated", ["name"]),
        6: ("error", []),
    }
    assert EndUser.objects.for_workspace(workspace).get(user_id="u1").name == "Ann"  # a dry run


def test_a_merged_row_lists_what_the_row_changed(tenant):
    bare(tenant.workspace, email="x@example.com", billing_id="cus_x", at=T0)
    identify(tenant.workspace, "u1", name="Ann")
    job = run_import(tenant.workspace, csv_bytes([{"user_id": "u1", "email": "x@example.com", "name": "Ann B"}]))
    assert changes_by_row(job) == {2: ("merged", ["name"])}


def test_unchanged_rows_list_nothing(tenant):
    identify(tenant.workspace, "u1", name="Ann", at=T0)
    job = run_import(tenant.workspace, csv_bytes([{"user_id": "u1", "name": "Ann"}]))
    assert changes_by_row(job) == {2: ("unchanged", [])}


def test_the_dashboard_report_shows_the_changed_fields(member_client, tenant, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    identify(tenant.workspace, "u1", name="Ann", email="ann@example.com", at=T0)
    data = csv_bytes([{"user_id": "u1", "billing_id": "cus_ann", "name": "Annie"}])
    upload = tmp_path / "users.csv"
    upload.write_bytes(data)
    with upload.open("rb") as file:
        response = member_client.post("/csv/import/", {"file": file}, follow=True)
    page = response.content.decode()
    assert "changes: <strong>Name</strong>, <strong>Billing id</strong>" in page
