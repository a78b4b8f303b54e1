"""manage.py kana_config export WORKSPACE / apply FILE [--dry-run] (SPEC §11 "Config as code")."""

import io

import pytest
import yaml
from django.core.management import CommandError, call_command

from entitlements.models import Package
from features.models import Feature
from kana.models import AuditEntry

from .api_support import feature
from .conftest import make_tenant
from .entitlement_support import package

pytestmark = pytest.mark.django_db


def export(workspace) -> str:
    out = io.StringIO()
    call_command("kana_config", "export", str(workspace.pk), stdout=out)
    return out.getvalue()


def apply(path, *options) -> str:
    out = io.StringIO()
    call_command("kana_config", "apply", str(path), *options, stdout=out)
    return out.getvalue()


@pytest.fixture
def configured(tenant):
    feature(tenant, "messages")
    feature(tenant, "sso", type="BINARY")
    package(tenant, "pro-plan", {"feature": "messages", "limit": 500}, {"feature": "sso", "limit": None})
    package(
        tenant,
        "extra-seats",
        {"feature": "messages", "limit": 12.5, "reset_period": "day"},
        status="draft",
        is_addon=True,
    )
    return tenant


def write(tmp_path, config: dict, name="kana.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_export_writes_features_and_packages_as_yaml(configured, tmp_path):
    config = yaml.safe_load(export(configured.workspace))

    assert config["workspace"] == "Acme"
    assert [f["id"] for f in config["features"]] == ["messages", "sso"]
    assert config["features"][1] == {
        "id": "sso",
        "name": "Sso",
        "type": "BINARY",
        "unit_label": "",
        "unit_label_plural": "",
        "metadata": {},
        "archived": False,
    }
    pro = next(p for p in config["packages"] if p["id"] == "pro-plan")
    assert pro["status"] == "published" and pro["is_addon"] is False
    assert pro["features"] == [
        {"feature": "messages", "limit": 500, "overage_enabled": False, "reset_period": "month"},
        {"feature": "sso", "limit": None, "overage_enabled": False, "reset_period": "month"},
    ]
    extra = next(p for p in config["packages"] if p["id"] == "extra-seats")
    assert extra["features"][0]["limit"] == 12.5 and extra["status"] == "draft"

    target = tmp_path / "out.yaml"
    call_command("kana_config", "export", "Acme", str(target), stderr=io.StringIO())
    assert target.read_text() == export(configured.workspace)


def test_applying_an_export_changes_nothing(configured, tmp_path):
    path = tmp_path / "kana.yaml"
    path.write_text(export(configured.workspace))
    audit_rows = AuditEntry.objects.count()

    out = apply(path)
    assert "= 4 unchanged" in out and "applied 0 change(s)" in out
    assert AuditEntry.objects.count() == audit_rows


def test_an_export_applied_to_another_workspace_recreates_it(configured, tmp_path):
    other = make_tenant("Staging")
    path = tmp_path / "kana.yaml"
    path.write_text(export(configured.workspace))

    out = apply(path, "--workspace", str(other.workspace.pk))
    assert "+ feature messages" in out and "+ package pro-plan" in out and "applied 4 change(s) to Staging" in out
    mine, theirs = yaml.safe_load(export(configured.workspace)), yaml.safe_load(export(other.workspace))
    assert {**mine, "workspace": "Staging"} == theirs
    assert AuditEntry.objects.filter(workspace=other.workspace, actor="cli", action="package.create").count() == 2


def test_a_dry_run_shows_the_difference_and_changes_nothing(configured, tmp_path):
    config = yaml.safe_load(export(configured.workspace))
    config["features"][0]["unit_label"] = "message"
    config["features"].append({"id": "exports", "type": "CONSUMABLE"})
    config["packages"][0]["features"][0]["limit"] = 50  # extra-seats: a draft, edited freely
    config["packages"][1]["name"] = "Pro"  # pro-plan: published, its name may change
    path = write(tmp_path, config)

    out = apply(path, "--dry-run")
    assert "~ feature messages: unit_label '' -> 'message'" in out
    assert "+ feature exports: type 'CONSUMABLE'" in out
    assert "~ package extra-seats: features [messages=12.5/day] -> [messages=50/day]" in out
    assert "~ package pro-plan: name 'pro-plan' -> 'Pro'" in out
    assert "dry run: 4 change(s)" in out
    assert not Feature.objects.filter(key="exports").exists()
    assert Package.objects.get(key="pro-plan").name == "pro-plan"

    apply(path)
    assert Feature.objects.get(workspace=configured.workspace, key="messages").unit_label == "message"
    assert Package.objects.get(key="pro-plan").name == "Pro"
    assert Package.objects.get(key="extra-seats").features.get().limit == 50
    assert "= 5 unchanged" in apply(path)


def test_changes_to_a_published_package_are_refused_and_nothing_is_applied(configured, tmp_path):
    config = yaml.safe_load(export(configured.workspace))
    config["features"][0]["name"] = "Messages sent"  # valid on its own, but the file applies whole
    config["packages"][1]["features"][0]["limit"] = 1000
    config["packages"][1]["is_addon"] = True
    path = write(tmp_path, config)

    with pytest.raises(CommandError, match="1 change\\(s\\) refused: nothing applied"):
        apply(path)
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("kana_config", "apply", str(path), "--dry-run", stdout=out)
    assert "! package pro-plan is published: its features, is_addon cannot change" in out.getvalue()
    assert "messages=500/month" in out.getvalue() and "messages=1000/month" in out.getvalue()
    assert Feature.objects.get(key="messages").name == "Messages"
    assert Package.objects.get(key="pro-plan").features.get(feature__key="messages").limit == 500

    config = yaml.safe_load(export(configured.workspace))
    config["packages"][1]["status"] = "archived"  # allowed: published -> archived
    apply(write(tmp_path, config))
    assert Package.objects.get(key="pro-plan").status == "archived"
    config["packages"][1]["status"] = "published"
    with pytest.raises(CommandError, match="refused"):
        apply(write(tmp_path, config))


def test_a_service_refusal_rolls_the_whole_file_back(configured, tmp_path):
    config = yaml.safe_load(export(configured.workspace))
    config["features"].append({"id": "reports"})
    config["packages"].append({"id": "broken", "features": [{"feature": "nope", "limit": 1}]})
    with pytest.raises(CommandError, match="no feature 'nope'.*nothing applied"):
        apply(write(tmp_path, config))
    assert not Feature.objects.filter(key="reports").exists()


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"features": [{"name": "no id"}]}, "features[0].id: is required"),
        ({"features": [{"id": "a", "type": "METERED"}]}, "features[0].type: must be one of"),
        ({"features": [{"id": "a", "colour": "red"}]}, "features[0].colour: unknown field"),
        ({"features": [{"id": "a"}, {"id": "a"}]}, "features[1].id: 'a' is named twice"),
        ({"packages": [{"id": "p", "features": [{"feature": "m", "limit": -1}]}]}, "packages[0].features[0].limit"),
        ({"packages": [{"id": "p", "features": [{"feature": "m", "limit": "lots"}]}]}, "packages[0].features[0].limit"),
        ({"packages": [{"id": "p", "is_addon": "yes"}]}, "packages[0].is_addon: must be true or false"),
        ({"packages": [{"id": "p", "status": "live"}]}, "packages[0].status: must be one of"),
    ],
)
def test_a_bad_file_is_refused_naming_the_place(tenant, tmp_path, config, where):
    path = write(tmp_path, {"workspace": "Acme", **config})
    with pytest.raises(CommandError, match=where.replace("[", "\\[").replace("]", "\\]").replace("(", "\\(")):
        apply(path)


def test_a_file_without_a_workspace_needs_one_named(tenant, tmp_path):
    path = write(tmp_path, {"features": [{"id": "messages"}]})
    with pytest.raises(CommandError, match="names no workspace"):
        apply(path)
    assert "applied 1 change(s) to Acme" in apply(path, "--workspace", "Acme")
