"""manage.py export_users / import_users take the workspace by id or by name."""

import csv
import io

import pytest
from django.core.management import CommandError, call_command

from kana.management.workspaces import workspace_from_argument
from kana.models import Workspace

pytestmark = pytest.mark.django_db

HEADER = "kana_id,user_id,name,email,billing_id,billing_provider,created_at,flags\n"


def exported_user_ids(workspace_argument: str) -> list[str]:
    out = io.StringIO()
    call_command("export_users", workspace_argument, stdout=out, stderr=io.StringIO())
    return [row["user_id"] for row in csv.DictReader(io.StringIO(out.getvalue()))]


def test_it_imports_and_exports_by_name_as_by_id(tmp_path):
    acme = Workspace.objects.create(name="Acme Inc")
    Workspace.objects.create(name="Globex")
    source = tmp_path / "users.csv"
    source.write_text(HEADER + ",u1,Ann,ann@example.com,,,,\n,u2,Bob,,,,,\n", encoding="utf-8")

    out = io.StringIO()
    call_command("import_users", "Acme Inc", str(source), "--dry-run", stdout=out, stderr=io.StringIO())
    assert "2 created" in out.getvalue() and exported_user_ids("Acme Inc") == []
    call_command("import_users", "Acme Inc", str(source), stdout=io.StringIO(), stderr=io.StringIO())

    assert exported_user_ids("Acme Inc") == ["u1", "u2"]
    assert exported_user_ids(str(acme.pk)) == ["u1", "u2"]
    assert exported_user_ids("Globex") == []


def test_an_id_wins_over_a_name_that_looks_like_one():
    first = Workspace.objects.create(name="Acme")
    Workspace.objects.create(name=str(first.pk))
    assert workspace_from_argument(str(first.pk)) == first


def test_a_numeric_name_is_found_when_no_workspace_has_that_id():
    named = Workspace.objects.create(name="424242")
    assert workspace_from_argument("424242") == named


def test_it_refuses_a_name_two_workspaces_share_and_names_their_ids():
    one, two = Workspace.objects.create(name="Twin"), Workspace.objects.create(name="Twin")
    with pytest.raises(CommandError, match=f"ids {one.pk}, {two.pk}"):
        call_command("export_users", "Twin", stdout=io.StringIO(), stderr=io.StringIO())


def test_it_says_when_nothing_matches(tmp_path):
    with pytest.raises(CommandError, match="no workspace with id or name 'Nope'"):
        call_command("export_users", "Nope", stdout=io.StringIO(), stderr=io.StringIO())
    with pytest.raises(CommandError, match="no workspace with id or name '999999'"):
        call_command("import_users", "999999", str(tmp_path / "x.csv"), stderr=io.StringIO())
