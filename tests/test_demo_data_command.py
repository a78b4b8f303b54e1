"""``manage.py demo_data``: a first visit to the dashboard has something to show, and running
the command again changes nothing."""

import io

import pytest
from django.core.management import CommandError, call_command
from django.db.models import Sum

from features.models import Event, EventStatus, Feature, MappingRule, Usage
from features.selectors import segment_status
from kana.models import Workspace
from users.models import EndUser, GroupMembership
from users.selectors import duplicate_groups


def run(**options) -> str:
    out = io.StringIO()
    call_command("demo_data", stdout=out, **options)
    return out.getvalue()


def state(workspace) -> dict:
    events = Event.objects.for_workspace(workspace)
    return {
        "users": list(
            EndUser.objects.for_workspace(workspace).order_by("pk").values_list("user_id", "email", "billing_id")
        ),
        "events": events.count(),
        "unmapped": events.filter(status=EventStatus.UNMAPPED).count(),
        "features": sorted(Feature.objects.for_workspace(workspace).values_list("key", flat=True)),
        "rules": list(MappingRule.objects.for_workspace(workspace).values_list("name", flat=True)),
        "usage": Usage.objects.for_workspace(workspace).aggregate(total=Sum("amount"))["total"],
    }


@pytest.fixture
def local(settings, db):
    settings.DEBUG = True  # the command refuses production settings


def test_it_fills_the_demo_workspace_with_something_for_every_page(local, tasks_in_process):
    output = run()
    workspace = Workspace.objects.get(name="Demo")
    assert f"workspace {workspace.pk} (Demo)" in output

    status = segment_status(workspace)
    assert status.unmapped_events > 0 and status.users_without_billing_id >= 2 and status.users_with_same_email == 4
    groups = {group.email.lower(): len(group.users) for group in duplicate_groups(workspace)}
    assert groups == {"grace@navy.test": 2, "alan@bletchley.test": 2}
    graces = EndUser.objects.for_workspace(workspace).filter(email_key="grace@navy.test")
    assert {u.billing_id for u in graces} == {"cus_GRACE01", "cus_GRACE02"}  # a conflict to review
    assert EndUser.objects.for_workspace(workspace).filter(user_id=None, email="katherine@nasa.test").exists()
    assert GroupMembership.objects.filter(user__workspace=workspace).count() == 2

    now = state(workspace)
    assert now["features"] == ["exports", "messages", "sso"] and now["rules"] == ["PDF exports"]
    unmapped = Event.objects.for_workspace(workspace).filter(status=EventStatus.UNMAPPED)
    reasons = set(unmapped.values_list("unmapped_reason", flat=True))
    assert reasons == {"no_matching_rule", "unknown_feature"}
    pdf = Event.objects.for_workspace(workspace).filter(name="Report Exported", payload__properties__format="pdf")
    assert pdf.exists() and not pdf.exclude(status=EventStatus.MAPPED).exists()  # mapped by the rule
    assert now["usage"] > 0


def test_running_it_twice_changes_nothing(local, tasks_in_process):
    run()
    workspace = Workspace.objects.get(name="Demo")
    before = state(workspace)
    output = run()
    assert state(workspace) == before
    assert "0 new messages" in output


def test_it_loads_into_a_named_workspace_and_refuses_an_unknown_one(local, tenant, tasks_in_process):
    run(workspace=str(tenant.workspace.pk))
    assert EndUser.objects.for_workspace(tenant.workspace).exists()
    assert not Workspace.objects.filter(name="Demo").exists()
    with pytest.raises(CommandError, match="no workspace 'Nope'"):
        run(workspace="Nope")


def test_it_refuses_production_settings(db, settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="local runs"):
        run()
    assert not Workspace.objects.exists()
