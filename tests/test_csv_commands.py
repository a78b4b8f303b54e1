"""manage.py export_users / import_users."""

import csv
import io

import pytest
from django.core.management import CommandError, call_command

from users.models import EndUser

from .csv_helpers import csv_bytes, identify, snapshot

pytestmark = pytest.mark.django_db


def test_export_to_a_file_and_to_stdout(tenant, tmp_path):
    for i in range(3):
        identify(tenant.workspace, f"u{i}", name=f"N{i}")
    target = tmp_path / "users.csv"
    err = io.StringIO()
    call_command("export_users", str(tenant.workspace.pk), str(target), stderr=err)
    rows = list(csv.DictReader(target.open(encoding="utf-8", newline="")))
    assert [r["user_id"] for r in rows] == ["u0", "u1", "u2"]
    assert "100%" in err.getvalue() and "3/3 users" in err.getvalue() and "exported 3 users" in err.getvalue()

    out = io.StringIO()
    call_command("export_users", str(tenant.workspace.pk), stdout=out, stderr=io.StringIO())
    assert out.getvalue() == target.read_bytes().decode()


def test_import_with_dry_run_then_apply_showing_progress(tenant, tmp_path):
    source = tmp_path / "in.csv"
    source.write_bytes(csv_bytes([{"user_id": f"u{i}", "name": f"N{i}"} for i in range(2500)]))
    out, err = io.StringIO(), io.StringIO()
    call_command("import_users", str(tenant.workspace.pk), str(source), "--dry-run", stdout=out, stderr=err)
    assert "2,500 created" in out.getvalue() and "dry run" in out.getvalue()
    assert "2500/2500 rows" in err.getvalue() and "100%" in err.getvalue()
    assert not EndUser.objects.exists()

    call_command("import_users", str(tenant.workspace.pk), str(source), stdout=out, stderr=io.StringIO())
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 2500


def test_import_errors_fail_the_command_and_change_nothing(tenant, tmp_path):
    identify(tenant.workspace, "u1", name="Ann")
    before = snapshot(tenant.workspace)
    source = tmp_path / "in.csv"
    source.write_bytes(csv_bytes([{"user_id": "u1", "name": "New"}, {"user_id": "u2", "email": "nope"}]))
    out = io.StringIO()
    with pytest.raises(CommandError, match="nothing was changed"):
        call_command("import_users", str(tenant.workspace.pk), str(source), stdout=out, stderr=io.StringIO())
    assert "row 3: invalid_email" in out.getvalue()
    assert snapshot(tenant.workspace) == before

    source.write_bytes(b"nonsense\n")
    with pytest.raises(CommandError, match="invalid_header|missing_header"):
        call_command("import_users", str(tenant.workspace.pk), str(source), stderr=io.StringIO())
