"""Dashboard pages through Django's test client: what each page shows and what its forms do."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from dashboard.forms import format_value, parse_value
from features.models import MappingRule
from features.selectors import user_usage_by_day
from features.services import feature_create
from kana.models import ApiKey
from tests.conftest import SegmentClient, make_tenant
from users.models import EndUser, MergeReason, MergeRecord
from users.profile import ProfileChanges
from users.services import identify_user


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# --- Segment page ----------------------------------------------------------------------


def test_segment_page_counts_what_segment_sent(member_client, segment):
    page = member_client.get("/").content.decode()
    assert "Waiting for the first event" in page and "never" in page

    assert segment.identify("u1", {"email": "Same@Example.com", "billingUserId": "cus_A1"}).status_code == 200
    assert segment.identify("u2", {"email": "same@example.com"}).status_code == 200
    assert segment.identify("u3", {"email": "solo@example.com"}).status_code == 200
    for name in ("Report Exported", "Report Exported", "Invite Sent"):
        assert segment.track("u3", name, {"plan": {"tier": "pro"}}).status_code == 200

    response = member_client.get("/")
    status = response.context["status"]
    assert (status.unmapped_events, status.users_without_billing_id, status.users_with_same_email) == (3, 2, 2)
    page = response.content.decode()
    assert "Connected: events are arriving." in page
    assert 'href="/unmapped/"' in page and 'href="/users/?flag=no_billing_id"' in page
    assert 'href="/duplicates/"' in page


def test_the_segment_page_shows_the_workspace_id_the_commands_take(member_client, tenant):
    page = member_client.get("/").content.decode()
    assert f"Workspace id <code>{tenant.workspace.pk}</code>" in page
    assert f"manage.py export_users {tenant.workspace.pk} users.csv" in page


def test_a_workspace_without_live_keys_is_shown_as_not_connected(member_client, tenant):
    for key in ApiKey.objects.for_workspace(tenant.workspace):
        member_client.post(f"/keys/{key.pk}/revoke/")
    assert "Not connected: create an API key" in member_client.get("/").content.decode()


def test_a_new_key_is_shown_once_and_works_until_revoked(member_client, tenant):
    response = member_client.post("/keys/", {"name": "segment prod"})
    assert response.status_code == 200
    raw = response.context["new_key"].raw_key
    assert raw.startswith("prv_live_") and raw in response.content.decode()
    stored = ApiKey.objects.get(workspace=tenant.workspace, name="segment prod")
    assert stored.key_hash != raw and raw not in stored.key_hash

    page = member_client.get("/").content.decode()
    assert raw not in page and f"{stored.prefix}…" in page

    sender = SegmentClient(tenant)
    assert sender.post("/v1/identify", {"userId": "k1"}, auth=f"Bearer {raw}").status_code == 200
    assert member_client.post(f"/keys/{stored.pk}/revoke/").status_code == 302
    assert sender.post("/v1/identify", {"userId": "k2"}, auth=f"Bearer {raw}").status_code == 401
    assert "revoked" in member_client.get("/").content.decode()


# --- Users -----------------------------------------------------------------------------


def test_users_are_searched_and_filtered_by_flag(member_client, segment):
    segment.identify("alice-1", {"email": "alice@example.com", "name": "Alice", "billingUserId": "cus_ALICE"})
    segment.identify("bob-1", {"email": "bob@example.com", "name": "Bob"})
    segment.identify("bob-2", {"email": "BOB@example.com"})

    listing = member_client.get("/users/?q=alice").content.decode()
    assert "alice-1" in listing and "bob-1" not in listing
    assert "bob-2" in member_client.get("/users/?q=BOB-2").content.decode()

    no_billing = member_client.get("/users/?flag=no_billing_id").content.decode()
    assert "bob-1" in no_billing and "bob-2" in no_billing and "alice-1" not in no_billing
    assert "/csv/export/" in no_billing and 'href="/csv/"' in no_billing
    same = member_client.get("/users/?flag=same_email").content.decode()
    assert "bob-1" in same and "alice-1" not in same
    assert "same email" in same


def test_user_detail_shows_ids_usage_chart_events_and_merges(member_client, segment, tenant, member):
    workspace = tenant.workspace
    feature_create(workspace=workspace, key="exports", name="Exports")
    segment.identify("u1", {"email": "pat@example.com", "name": "Pat"})
    segment.identify("pat-dup", {"email": "pat@example.com"})
    segment.post("/v1/alias", {"previousId": "anon-pat", "userId": "u1"})
    today = timezone.now().astimezone(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    sent = [(today, 2), (today, 1), (today - timedelta(days=3), 5), (today - timedelta(days=45), 7)]
    for moment, delta in sent:
        segment.track("u1", "Report Exported", {"featureId": "exports", "delta": delta}, timestamp=_iso(moment))
    survivor = EndUser.objects.get(workspace=workspace, user_id="u1")
    duplicate = EndUser.objects.get(workspace=workspace, user_id="pat-dup")
    member_client.post("/duplicates/merge/", {"users": [survivor.pk, duplicate.pk]})

    response = member_client.get(f"/users/{survivor.pk}/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "u1" in page and "anon-pat" in page and "pat-dup" in page and "Pat" in page
    assert [row["total"] for row in response.context["usage"]] == [Decimal(15)]
    chart = response.context["usage"][0]["chart"]
    assert chart.total == Decimal(8)  # the 45-day-old event is outside the chart
    assert f"{today:%Y-%m-%d}: 3" in page and f"{today - timedelta(days=3):%Y-%m-%d}: 5" in page
    assert page.count('<rect class="bar') == 2
    assert "Report Exported" in page
    assert "Admin" in page and member.username in page  # the merge ledger row


def test_usage_by_day_fills_every_day_and_keeps_to_the_workspace(segment, tenant):
    feature_create(workspace=tenant.workspace, key="exports")
    feature_create(workspace=tenant.workspace, key="seats")
    day = date(2024, 3, 10)
    for moment, delta in [("2024-03-10T23:59:00Z", 1), ("2024-03-10T00:00:00Z", 2), ("2024-03-09T12:00:00Z", -1)]:
        segment.track("u1", "Export", {"featureId": "exports", "delta": delta}, timestamp=moment)
    segment.track("u1", "Export", {"featureId": "exports"}, timestamp="2024-03-11T00:00:00Z")  # after "today"
    user = EndUser.objects.get(workspace=tenant.workspace, user_id="u1")

    by_day = user_usage_by_day(tenant.workspace, user_pk=user.pk, days=3, today=day)
    assert list(by_day) == ["exports", "seats"]
    assert by_day["exports"] == [(date(2024, 3, 8), 0), (date(2024, 3, 9), -1), (date(2024, 3, 10), 3)]
    assert by_day["seats"] == [(date(2024, 3, 8), 0), (date(2024, 3, 9), 0), (date(2024, 3, 10), 0)]
    assert user_usage_by_day(make_tenant("Else").workspace, user_pk=user.pk, days=3, today=day) == {}


def test_delete_asks_first_then_deletes(member_client, segment, tenant):
    segment.identify("doomed", {"email": "d@example.com"})
    user = EndUser.objects.get(workspace=tenant.workspace, user_id="doomed")
    confirm = member_client.get(f"/users/{user.pk}/delete/")
    assert confirm.status_code == 200 and b"cannot be undone" in confirm.content
    assert EndUser.objects.filter(pk=user.pk).exists()
    response = member_client.post(f"/users/{user.pk}/delete/", follow=True)
    assert response.redirect_chain[-1][0] == "/users/"
    assert not EndUser.objects.filter(pk=user.pk).exists()
    assert member_client.get(f"/users/{user.pk}/").status_code == 404


# --- Duplicate review ------------------------------------------------------------------


def _three_duplicates(workspace):
    base = timezone.now() - timedelta(days=3)

    def make(user_id, changes, when):
        return identify_user(workspace=workspace, user_id=user_id, changes=changes, occurred_at=when).user

    first = make("first", ProfileChanges(email="dup@example.com", name="Old Name"), base)
    second = make("second", ProfileChanges(email="DUP@example.com", billing_id="cus_SECOND"), base)
    third = make("third", ProfileChanges(email="dup@example.com", name="New Name"), base + timedelta(days=1))
    EndUser.objects.filter(pk=second.pk).update(created_at=base + timedelta(hours=1))
    EndUser.objects.filter(pk=third.pk).update(created_at=base + timedelta(hours=2))
    EndUser.objects.filter(pk=first.pk).update(created_at=base)
    return first, second, third


def test_duplicate_groups_are_listed_with_all_users_selected(member_client, tenant):
    first, second, third = _three_duplicates(tenant.workspace)
    page = member_client.get("/duplicates/").content.decode()
    assert "dup@example.com" in page
    for user in (first, second, third):
        assert f'name="users" value="{user.pk}" checked' in page


def test_the_preview_computes_the_merge_without_saving(member_client, tenant):
    first, second, third = _three_duplicates(tenant.workspace)
    response = member_client.get(f"/duplicates/preview/?users={third.pk}&users={first.pk}&users={second.pk}")
    assert response.status_code == 200
    assert response.context["survivor"].pk == first.pk  # created first
    result = response.context["result"]
    assert (result.name, result.billing_id, result.user_id) == ("New Name", "cus_SECOND", "first")
    assert response.context["result_user_ids"] == ["first", "second", "third"]
    assert EndUser.objects.filter(workspace=tenant.workspace).count() == 3
    assert EndUser.objects.get(pk=first.pk).name == "Old Name"
    assert not MergeRecord.objects.exists()

    picked = member_client.get(f"/duplicates/preview/?users={first.pk}&users={third.pk}&survivor={third.pk}")
    assert picked.context["survivor"].pk == third.pk
    assert picked.context["result_user_ids"] == ["third", "first"]
    assert member_client.get(f"/duplicates/preview/?users={first.pk}").status_code == 302
    assert member_client.get(f"/duplicates/preview/?users={first.pk}&users=x").status_code == 404


def test_confirming_merges_once_with_the_admin_as_actor(member_client, member, tenant):
    first, second, third = _three_duplicates(tenant.workspace)
    form = {"users": [first.pk, second.pk, third.pk], "survivor": second.pk}
    response = member_client.post("/duplicates/merge/", form)
    assert response.status_code == 302 and response["Location"] == f"/users/{second.pk}/"
    assert list(EndUser.objects.filter(workspace=tenant.workspace).values_list("pk", flat=True)) == [second.pk]
    survivor = EndUser.objects.get(pk=second.pk)
    assert (survivor.name, survivor.billing_id, survivor.user_id) == ("New Name", "cus_SECOND", "second")
    records = MergeRecord.objects.filter(survivor_key=second.pk)
    assert {r.absorbed_id for r in records} == {first.pk, third.pk}
    assert {(r.reason, r.actor) for r in records} == {(MergeReason.ADMIN, f"user:{member.username}")}

    again = member_client.post("/duplicates/merge/", form, follow=True)  # a double submit
    assert "already merged" in again.content.decode()
    assert MergeRecord.objects.count() == 2


# --- Features, rules, explorer ---------------------------------------------------------


def test_features_are_created_from_the_page(member_client, tenant):
    response = member_client.post("/features/", {"key": "exports", "name": "Exports", "type": "CONSUMABLE"})
    assert response.status_code == 302
    page = member_client.get("/features/").content.decode()
    assert "exports" in page and "Exports" in page
    again = member_client.post("/features/", {"key": "exports", "name": "", "type": "BINARY"})
    assert again.status_code == 400 and "already exists" in again.content.decode()
    bad = member_client.post("/features/", {"key": "has space", "type": "BINARY"})
    assert bad.status_code == 400 and "1-100 letters" in bad.content.decode()


def test_the_explorer_links_prefill_the_rule_builder(member_client, segment, tenant):
    segment.track("u1", "Report Exported", {"format": "pdf", "pages": 3, "flag": True, "code": "42"})
    segment.track("u1", "Report Exported", {"format": "csv", "pages": 3})
    segment.track("u1", "Invite Sent", {"featureId": "invites"})

    explorer = member_client.get("/unmapped/")
    by_event = {row["event"]: row for row in explorer.context["by_event"]}
    assert by_event["Report Exported"]["count"] == 2 and by_event["Invite Sent"]["count"] == 1
    assert by_event["Report Exported"]["rule_url"] == "/rules/new/?event=Report+Exported"

    rows = member_client.get("/unmapped/?event=Report+Exported").context["by_property"]["rows"]
    shown = {(r["property"], r["shown"]): r for r in rows}
    assert shown[("pages", "3")]["count"] == 2
    assert shown[("code", '"42"')]["count"] == 1  # a numeric string stays text in the builder
    builder = member_client.get(shown[("format", "pdf")]["rule_url"])
    assert builder.context["form"].initial["event_name"] == "Report Exported"
    first_row = builder.context["formset"].forms[0].initial
    assert first_row == {"property": "format", "operator": "equals", "value": "pdf"}
    invites = member_client.get("/unmapped/?event=Invite+Sent").context["by_property"]["rows"]
    assert invites[0]["feature_url"] == "/features/?key=invites"


def _rule_post(name, event, feature, conditions, amount=""):
    data = {
        "name": name,
        "event_name": event,
        "feature": feature,
        "amount_property": amount,
        "conditions-TOTAL_FORMS": str(len(conditions)),
        "conditions-INITIAL_FORMS": str(len(conditions)),
        "conditions-MIN_NUM_FORMS": "0",
        "conditions-MAX_NUM_FORMS": "20",
    }
    for index, (prop, operator, value) in enumerate(conditions):
        data.update({f"conditions-{index}-property": prop, f"conditions-{index}-operator": operator})
        data[f"conditions-{index}-value"] = value
    return data


def test_the_builder_creates_a_rule_with_typed_values(member_client, tenant, django_capture_on_commit_callbacks):
    feature_create(workspace=tenant.workspace, key="exports")
    conditions = [
        ("pages", "gte", "3"),
        ("", "equals", ""),  # a blank row is ignored
        ("code", "equals", '"42"'),
        ("format", "in", "pdf, csv"),
        ("flag", "exists", ""),
    ]
    with django_capture_on_commit_callbacks(execute=False):
        response = member_client.post("/rules/new/", _rule_post("Exports", "Report Exported", "exports", conditions))
    assert response.status_code == 302
    rule = MappingRule.objects.get(workspace=tenant.workspace)
    assert response["Location"] == f"/rules/#rule-{rule.pk}"
    assert rule.event_name == "Report Exported" and rule.feature.key == "exports"
    assert rule.conditions == [
        {"property": "pages", "operator": "gte", "value": 3},
        {"property": "code", "operator": "equals", "value": "42"},
        {"property": "format", "operator": "in", "value": ["pdf", "csv"]},
        {"property": "flag", "operator": "exists"},
    ]
    page = member_client.get("/rules/").content.decode()
    assert "pages ≥ 3" in page and "code equals &quot;42&quot;" in page and "format is one of pdf, csv" in page
    assert f'data-progress-url="/rules/{rule.pk}/progress/"' in page
    progress = member_client.get(f"/rules/{rule.pk}/progress/").json()
    assert progress == {"id": rule.pk, "status": "queued", "scanned": 0, "mapped": 0, "finished": False}


def test_builder_errors_are_shown_on_the_row(member_client, tenant):
    feature_create(workspace=tenant.workspace, key="exports")
    bad = member_client.post("/rules/new/", _rule_post("R", "", "exports", [("", "equals", ""), ("n", "gt", "lots")]))
    assert bad.status_code == 400
    assert "“&gt;” compares numbers" in bad.content.decode()  # the operator as the builder shows it
    assert bad.context["formset"].forms[1].non_field_errors()
    empty = member_client.post("/rules/new/", _rule_post("R", "", "exports", [("", "equals", "")]))
    assert empty.status_code == 400 and "needs an event name or at least one condition" in empty.content.decode()
    no_feature = member_client.post("/rules/new/", _rule_post("R", "X", "", []))
    assert no_feature.status_code == 400
    assert not MappingRule.objects.exists()


def test_progress_reports_a_finished_reprocessing(member_client, segment, tenant, django_capture_on_commit_callbacks):
    feature_create(workspace=tenant.workspace, key="exports")
    for _ in range(3):
        segment.track("u1", "Report Exported", {"format": "pdf"})
    segment.track("u1", "Other", {})
    with django_capture_on_commit_callbacks(execute=False):
        member_client.post("/rules/new/", _rule_post("Exports", "Report Exported", "exports", []))
    rule = MappingRule.objects.get(workspace=tenant.workspace)
    from features import reprocessing
    from features.models import ReprocessingJob

    job = ReprocessingJob.objects.get(rule=rule)
    assert reprocessing.claim_job(job.pk)
    reprocessing.process_chunk(job.pk)
    assert member_client.get(f"/rules/{rule.pk}/progress/").json() == {
        "id": rule.pk,
        "status": "done",
        "scanned": 3,
        "mapped": 3,
        "finished": True,
    }
    member_client.post(f"/rules/{rule.pk}/active/")
    assert not MappingRule.objects.get(pk=rule.pk).active


# --- Small pure parts ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("pro", "pro"), ("3", 3), ("2.5", 2.5), ("true", True), ('"3"', "3"), ("", None), ("[1, 2]", [1, 2])],
)
def test_condition_values_parse_as_typed(text, value):
    assert parse_value(text) == value
    if value is not None and not isinstance(value, list):
        assert parse_value(format_value(value)) == value


def test_the_rules_page_reads_progress_in_one_query_whatever_the_number_of_rules(member_client, tenant):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.usage_support import make_feature, make_rule

    make_feature(tenant.workspace, "exports")

    def queries_for_page() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert member_client.get("/rules/").status_code == 200
        return len(captured)

    make_rule(tenant.workspace, "exports", event="Report Exported", name="first")
    with_one = queries_for_page()
    for n in range(5):
        make_rule(tenant.workspace, "exports", event=f"Event {n}", name=f"rule {n}")
    assert queries_for_page() == with_one


def test_user_pages_link_to_the_next_page_keeping_the_search_and_flag(member_client, tenant):
    from dashboard.views import users as user_views

    for n in range(user_views.PAGE_SIZE + 1):
        identify_user(
            workspace=tenant.workspace, user_id=f"p-{n}", changes=ProfileChanges(), occurred_at=timezone.now()
        )
    page = member_client.get("/users/", {"q": "p-", "flag": "no_billing_id"}).content.decode()
    assert 'href="?q=p-&amp;flag=no_billing_id&amp;page=2">Older →</a>' in page
    second = member_client.get("/users/", {"q": "p-", "flag": "no_billing_id", "page": 2}).content.decode()
    assert 'href="?q=p-&amp;flag=no_billing_id&amp;page=1">← Newer</a>' in second
