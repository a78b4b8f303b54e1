"""manage.py demo (what `make run` prints): the workspace id the README's commands need."""

import io

import pytest
from django.core.management import call_command

from kana.management.commands import demo
from kana.models import Workspace

pytestmark = pytest.mark.django_db


def test_it_prints_the_workspace_id_once_and_again(settings, tmp_path, monkeypatch):
    settings.DEBUG, settings.BASE_DIR = True, tmp_path
    monkeypatch.setattr(demo, "CREDENTIALS", tmp_path / "var" / "demo-credentials.txt")
    first, again = io.StringIO(), io.StringIO()
    call_command("demo", stdout=first)
    call_command("demo", stdout=again)
    workspace = Workspace.objects.get(name="Demo")
    assert f"Workspace:        {workspace.pk} (Demo)" in first.getvalue()
    assert first.getvalue() == again.getvalue()
