"""Issue 10's dashboard fixes in a real browser (Debian's chromium through Playwright): the rule
builder with and without JavaScript, the charts' axes, conflicts in a merge preview, the CSV
report's changed fields, friendly 404s, English counts, the demo data, and every page at
390 px wide (a phone) without sideways scrolling.

Screenshots go where tests/test_dashboard_browser.py puts them (KANA_SCREENSHOTS_DIR).
"""

import io
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command

from features.models import Feature, MappingRule
from features.services import feature_create
from tests import test_dashboard_browser as base
from users.models import EndUser

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}
# The fixtures and helpers of the first browser tests: a live workspace, its admin, Segment's library.
tenant, admin, analytics = base.tenant, base.admin, base.analytics
shot, sign_in = base.shot, base.sign_in


def conditions(page) -> list[tuple[str, str, str]]:
    rows = page.locator("#conditions .condition-row")
    return [
        (
            rows.nth(i).locator("input[name$=-property]").input_value(),
            rows.nth(i).locator("select[name$=-operator]").input_value(),
            rows.nth(i).locator("input[name$=-value]").input_value(),
        )
        for i in range(rows.count())
    ]


def names_of_rows(page) -> list[str]:
    return page.eval_on_selector_all("#conditions .condition-row input[name$=-property]", "els => els.map(e => e.name)")


def test_the_rule_builder_adds_and_removes_rows_and_creates_the_feature_it_needs(
    page, live_server, tenant, admin, analytics
):
    for fmt, pages in (("pdf", 3), ("pdf", 12), ("csv", 5)):
        analytics.track("u1", "Report Exported", {"format": fmt, "pages": pages})
    sign_in(page)
    page.goto("/rules/new/")
    page.evaluate("window.__samePage = true")
    assert conditions(page) == [("", "equals", "")]  # one row, not four
    assert page.get_attribute("#id_conditions-0-property", "placeholder") == "e.g. plan.tier"
    placeholder_style = page.evaluate(
        "getComputedStyle(document.querySelector('#id_conditions-0-property'), '::placeholder').fontStyle"
    )
    assert placeholder_style == "italic"  # reads as a hint, not as a value
    assert page.is_visible("#new-feature")  # no feature yet: created with the rule

    page.fill("#id_name", "Big PDF exports")
    page.fill("#id_event_name", "Report Exported")
    page.fill("#id_conditions-0-property", "format")
    page.fill("#id_conditions-0-value", "pdf")
    page.click("text=+ Add a condition")
    page.click("text=+ Add a condition")
    assert len(conditions(page)) == 3
    page.fill("#id_conditions-1-property", "plan.tier")
    page.fill("#id_conditions-1-value", "pro")
    page.fill("#id_conditions-2-property", "pages")
    page.select_option("#id_conditions-2-operator", "gt")
    page.fill("#id_conditions-2-value", "lots")
    page.locator("#conditions .condition-row").nth(1).locator("text=Remove").click()
    assert conditions(page) == [("format", "equals", "pdf"), ("pages", "gt", "lots")]
    assert names_of_rows(page) == ["conditions-0-property", "conditions-1-property"]  # renumbered
    assert page.input_value("input[name=conditions-TOTAL_FORMS]") == "2"
    assert page.evaluate("window.__samePage") is True  # no round trip
    page.fill("#id_new_feature_key", "pdf-exports")
    page.fill("#id_new_feature_name", "PDF exports")
    shot(page, "rule_builder")

    page.click("#create-rule")
    errors = page.inner_text("#conditions .row-errors")
    assert "“>” compares numbers" in errors and "'gt'" not in errors
    assert not Feature.objects.filter(workspace=tenant.workspace).exists()
    shot(page, "rule_builder_error")

    page.fill("#id_conditions-1-value", "10")
    page.click("#create-rule")
    page.wait_for_url(re.compile(r"/rules/#rule-\d+$"))
    assert "Feature pdf-exports and rule “Big PDF exports” created" in page.inner_text(".messages")
    rule = MappingRule.objects.get(workspace=tenant.workspace)
    assert rule.feature.key == "pdf-exports"
    assert rule.conditions == [
        {"property": "format", "operator": "equals", "value": "pdf"},
        {"property": "pages", "operator": "gt", "value": 10},
    ]


def test_the_rule_builder_works_without_javascript(browser, live_server, tenant, admin):
    feature_create(workspace=tenant.workspace, key="exports")
    context = browser.new_context(java_script_enabled=False, base_url=live_server.url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    try:
        sign_in(page)
        page.goto("/rules/new/")
        assert page.is_visible("#new-feature")  # shown, as the script is not there to toggle it
        page.fill("#id_name", "Exports")
        page.fill("#id_conditions-0-property", "format")
        page.fill("#id_conditions-0-value", "pdf")
        page.click("text=+ Add a condition")
        page.wait_for_selector("#id_conditions-1-property")
        assert conditions(page) == [("format", "equals", "pdf"), ("", "equals", "")]
        assert page.input_value("#id_name") == "Exports"
        page.fill("#id_conditions-1-property", "pages")
        page.fill("#id_conditions-1-value", "3")
        page.locator("#conditions .condition-row").nth(0).locator("text=Remove").click()
        page.wait_for_function("document.querySelectorAll('#conditions .condition-row').length === 1")
        assert conditions(page) == [("pages", "equals", "3")]
        page.select_option("#id_feature", "exports")
        page.press("#id_conditions-0-value", "Enter")  # Enter creates the rule, it does not remove a row
        page.wait_for_url(re.compile(r"/rules/"))
        assert MappingRule.objects.get(workspace=tenant.workspace).conditions == [
            {"property": "pages", "operator": "equals", "value": 3}
        ]
    finally:
        context.close()


def test_usage_charts_have_dated_axes_and_zero_at_the_bottom(page, live_server, tenant, admin, analytics):
    feature_create(workspace=tenant.workspace, key="exports", name="Exports")
    feature_create(workspace=tenant.workspace, key="seats", name="Seats")
    now = datetime.now(UTC)
    for days_ago, delta in [(0, 3), (1, 1), (4, 6), (9, 2), (15, 4), (22, 1), (3, -2)]:
        analytics.track("kim", "Export", {"featureId": "exports", "delta": delta}, timestamp=now - timedelta(days_ago))
    user = EndUser.objects.get(workspace=tenant.workspace, user_id="kim")
    sign_in(page)
    page.goto(f"/users/{user.pk}/")
    exports, seats = page.locator("[data-feature=exports] svg"), page.locator("[data-feature=seats] svg")
    labels = exports.locator(".x-tick").all_text_contents()
    assert len(labels) == 5 and labels[-1] == f"{now:%b} {now.day}"
    assert exports.locator(".y-tick").all_text_contents() == ["10", "5", "0", "-2"]  # dates below, values left
    zero_line = float(seats.locator(".baseline").get_attribute("y1"))
    assert zero_line == float(seats.locator(".y-axis").get_attribute("y2"))  # the plot's bottom, not its top
    assert seats.locator(".y-tick").all_text_contents() == ["0"]
    shot(page, "user_usage_charts")


def test_a_merge_preview_points_out_conflicting_values(page, live_server, tenant, admin, analytics):
    analytics.identify("kim-laptop", {"email": "kim@example.com", "billingId": "cus_LAPTOP"})
    analytics.identify("kim-phone", {"email": "KIM@example.com", "billingId": "cus_PHONE"})
    sign_in(page)
    page.goto("/duplicates/")
    page.locator(".duplicate-group", has_text="kim@example.com").locator("text=Preview merge").click()
    page.wait_for_url(re.compile(r"/duplicates/preview/"))
    row = page.locator("#merge-conflicts tr[data-field=billing_id]")
    cells = row.locator("td").all_text_contents()
    assert cells[0] == "Billing id" and "cus_LAPTOP" in cells[1] and "cus_PHONE" in cells[2]
    assert cells[3].startswith("cus_PHONE")  # the newest is kept, and it says so
    assert "conflict" in page.inner_text("#merge-result")
    shot(page, "merge_preview_conflicts")


def test_the_csv_dry_run_names_the_fields_that_change(page, live_server, tenant, admin, analytics, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    analytics.identify("ann", {"email": "ann@example.com", "name": "Ann"})
    upload = tmp_path / "billing.csv"
    upload.write_text("kana_id,user_id,name,email,billing_id\n,ann,Ann,,cus_ANN\n,bob,Bob,bob@example.com,\n")
    sign_in(page)
    page.goto("/csv/")
    page.set_input_files("#id_file", str(upload))
    page.click("#import-form button[type=submit]")
    page.wait_for_url(re.compile(r"/csv/imports/\d+/$"))
    assert page.inner_text("#import-rows tr[data-row='2']").split("\t")[-1].strip() == "changes: Billing id"
    counts = page.inner_text("#import-counts")
    assert re.search(r"1\s+created", counts) and re.search(r"0\s+errors", counts)
    shot(page, "csv_dry_run_changes")


def test_missing_pages_are_friendly_and_counts_read_as_english(page, live_server, tenant, admin, analytics):
    analytics.identify("solo", {"email": "solo@example.com"})
    analytics.track("solo", "Report Exported", {})
    sign_in(page)
    assert page.inner_text("#box-unmapped .label") == "event not mapped to features"
    assert page.inner_text("#box-no-billing .label") == "user not connected to a billing provider"
    assert "just now" in page.inner_text("#last-event")
    response = page.goto("/users/999999/")
    assert response.status == 404
    assert page.is_visible("#not-found") and page.is_visible("nav >> text=Users")
    shot(page, "not_found")


def test_the_demo_data_gives_a_first_visit_something_to_see(page, live_server, tenant, admin, settings):
    settings.DEBUG = True  # the command is for local runs
    call_command("demo_data", workspace=str(tenant.workspace.pk), stdout=io.StringIO())
    settings.DEBUG = False
    sign_in(page)
    assert int(page.inner_text("#box-same-email .count")) == 4
    assert int(page.inner_text("#box-unmapped .count")) > 0
    shot(page, "demo_segment")
    page.goto("/duplicates/")
    shot(page, "demo_duplicates")
    ada = EndUser.objects.get(workspace=tenant.workspace, user_id="u-ada")
    page.goto(f"/users/{ada.pk}/")
    assert page.locator("[data-feature=messages] rect.bar").count() > 5
    shot(page, "demo_user_detail")
    page.goto("/unmapped/")
    shot(page, "demo_unmapped")


def phone_pages(tenant) -> list[str]:
    workspace = tenant.workspace
    kim, kim_too = EndUser.objects.for_workspace(workspace).filter(email_key="kim@example.com").order_by("pk")
    return [
        "/",
        "/users/",
        "/users/?flag=no_billing_id",
        f"/users/{kim.pk}/",
        "/duplicates/",
        f"/duplicates/preview/?users={kim.pk}&users={kim_too.pk}",
        "/features/",
        "/rules/",
        "/rules/new/",
        "/unmapped/",
        "/unmapped/?event=Report+Exported",
        "/csv/",
        "/users/999999/",
    ]


def test_every_page_fits_a_390px_phone(browser, live_server, tenant, admin, analytics):
    feature_create(workspace=tenant.workspace, key="exports", name="Exports")
    analytics.identify("kim-laptop-with-a-long-user-id", {"email": "kim@example.com", "billingId": "cus_LAPTOP0001"})
    analytics.identify("kim-phone", {"email": "KIM@example.com", "billingId": "cus_PHONE0001", "name": "Kim"})
    now = datetime.now(UTC)
    for days_ago in (0, 2, 5):
        when = now - timedelta(days_ago)
        analytics.track("kim-phone", "Export", {"featureId": "exports", "delta": 2}, timestamp=when)
    analytics.track("kim-phone", "Report Exported", {"format": "pdf", "plan": {"tier": "enterprise-annual"}})
    context = browser.new_context(viewport=PHONE, base_url=live_server.url, is_mobile=True, has_touch=True)
    context.set_default_timeout(15_000)
    page = context.new_page()
    try:
        sign_in(page)
        for url in phone_pages(tenant):
            page.goto(url)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"{url} is {width}px wide"
        page.goto("/")
        shot(page, "phone_segment")
        page.goto(f"/users/{EndUser.objects.get(workspace=tenant.workspace, user_id='kim-phone').pk}/")
        shot(page, "phone_user_detail")
        page.goto("/rules/new/")
        shot(page, "phone_rule_builder")
    finally:
        context.close()
