"""Issue 14: identity you can trust and undo (SPEC §12) in a real browser (Debian's chromium
through Playwright): a merge preview's conflicts and choosing a field's side, undoing the merge
from the merge history, the rule preview before saving, and the audit log naming who did what.

Screenshots go where tests/test_dashboard_browser.py puts them (KANA_SCREENSHOTS_DIR).
"""

import re

import pytest
from django.db.models import Sum

from features.models import Event, MappingRule, ReprocessingJob, Usage
from features.services import feature_create
from features.tasks import run_reprocessing_job
from tests import test_dashboard_browser as base
from users.models import EndUser, MergeRecord

pytestmark = pytest.mark.browser

# The fixtures and helpers of the first browser tests: a live workspace, its admin, Segment's library.
tenant, admin, analytics = base.tenant, base.admin, base.analytics
shot, sign_in = base.shot, base.sign_in


def conflict_cells(page, field: str) -> list[str]:
    return [cell.strip() for cell in page.locator(f"#merge-conflicts tr[data-field={field}] td").all_inner_texts()]


def test_choose_a_side_in_a_merge_then_undo_it_from_the_merge_history(page, live_server, tenant, admin, analytics):
    feature_create(workspace=tenant.workspace, key="exports", name="Exports")
    analytics.identify("kim-laptop", {"email": "kim@example.com", "name": "Kim", "billingId": "cus_LAPTOP"})
    analytics.identify("kim-phone", {"email": "KIM@example.com", "billingId": "cus_PHONE"})
    for delta in (2, 3):
        analytics.track("kim-phone", "Export", {"featureId": "exports", "delta": delta})
    analytics.track("kim-laptop", "Export", {"featureId": "exports"})
    laptop = EndUser.objects.get(workspace=tenant.workspace, user_id="kim-laptop")
    phone = EndUser.objects.get(workspace=tenant.workspace, user_id="kim-phone")
    phone_events = set(Event.objects.filter(user=phone).values_list("pk", flat=True))
    assert len(phone_events) == 3  # the identify and two tracks

    sign_in(page)
    page.goto("/duplicates/")
    page.locator(".duplicate-group", has_text="kim@example.com").locator("text=Preview merge").click()
    page.wait_for_url(re.compile(r"/duplicates/preview/"))
    # The conflict, both values and what the merge keeps: by default the newest (the phone's).
    field, survivor_value, absorbed_value, kept = conflict_cells(page, "billing_id")
    assert field == "Billing id" and survivor_value.startswith("cus_LAPTOP") and absorbed_value.startswith("cus_PHONE")
    assert kept.startswith("cus_PHONE")
    assert page.input_value("select[name=keep_billing_id]") == "newest"
    assert "(newest values kept)" in page.inner_text("#confirm-merge")

    page.select_option("select[name=keep_billing_id]", "survivor")
    page.click("#apply-choices")
    page.wait_for_url(re.compile(r"keep_billing_id=survivor"))
    assert conflict_cells(page, "billing_id")[3].startswith("cus_LAPTOP")
    assert "cus_LAPTOP" in page.inner_text("#merge-result") and "cus_PHONE" not in page.inner_text("#merge-result")
    assert "(chosen values kept)" in page.inner_text("#confirm-merge")
    assert EndUser.objects.filter(workspace=tenant.workspace).count() == 2  # a preview changes nothing
    shot(page, "merge_preview_choice")

    page.click("#confirm-merge")
    page.wait_for_url(re.compile(rf"/users/{laptop.pk}/$"))
    assert "Merged 1 user into" in page.inner_text(".messages")
    survivor = EndUser.objects.get(workspace=tenant.workspace)
    assert survivor.pk == laptop.pk and survivor.billing_id == "cus_LAPTOP"  # the chosen side, not the newest
    assert page.inner_text("[data-feature=exports] .js-total") == "6"
    record = MergeRecord.objects.get(survivor_key=laptop.pk)
    assert record.actor == "user:ada" and record.absorbed_id == phone.pk

    # Undo asks first: dismissing the confirmation changes nothing.
    undo = page.locator("#merges form.undo-merge button")
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    undo.click()
    page.wait_for_timeout(300)
    assert asked and f"Kana id {phone.pk}" in asked[0]
    assert EndUser.objects.filter(workspace=tenant.workspace).count() == 1
    page.once("dialog", lambda dialog: dialog.accept())
    undo.click()
    page.wait_for_selector(".messages >> text=Merge undone")
    assert f"back with Kana id {phone.pk}" in page.inner_text(".messages")
    assert "undone" in page.inner_text("#merges") and page.locator("#merges form.undo-merge").count() == 0
    shot(page, "merge_undone")

    # The absorbed user is back: same Kana id, its userIds, its events and their usage.
    restored = EndUser.objects.get(pk=phone.pk)
    assert restored.billing_id == "cus_PHONE"
    assert set(Event.objects.filter(user=restored).values_list("pk", flat=True)) == phone_events
    assert Usage.objects.filter(user=restored).aggregate(total=Sum("amount"))["total"] == 5
    page.goto(f"/users/{phone.pk}/")
    assert "kim-phone" in page.inner_text("#user-ids") and "kim-laptop" not in page.inner_text("#user-ids")
    assert page.inner_text("[data-feature=exports] .js-total") == "5"
    page.goto(f"/users/{laptop.pk}/")
    assert page.inner_text("[data-feature=exports] .js-total") == "1"

    page.goto("/audit/")
    merge_row = page.locator("#audit tr[data-action=merge]")
    assert merge_row.count() == 1 and "user:ada" in merge_row.inner_text()
    assert f"user {laptop.pk}" in merge_row.inner_text()
    shot(page, "audit_log")


def test_the_rule_preview_shows_what_creating_the_rule_then_maps(page, live_server, tenant, admin, analytics):
    feature_create(workspace=tenant.workspace, key="exports", name="Exports")
    for user, pages, delta in [("ann", 4, 2), ("ann", 9, 3), ("bob", 5, 1), ("bob", 1, 7), ("cy", 2, 1)]:
        analytics.track(user, "Report Exported", {"pages": pages, "delta": delta})
    analytics.track("cy", "Invite Sent", {"pages": 10})

    sign_in(page)
    page.goto("/rules/new/")
    page.fill("#id_name", "Long exports")
    page.fill("#id_event_name", "Report Exported")
    page.select_option("#id_feature", "exports")
    page.fill("#id_conditions-0-property", "pages")
    page.select_option("#id_conditions-0-operator", "gte")
    page.fill("#id_conditions-0-value", "4")
    page.click("#preview-rule")
    page.wait_for_function("document.querySelector('.js-preview-matched').textContent !== ''")
    shown = {
        "matched": page.inner_text(".js-preview-matched"),
        "amount": page.inner_text(".js-preview-amount"),
        "users": page.inner_text(".js-preview-users"),
    }
    assert shown == {"matched": "3", "amount": "6", "users": "2"}
    assert not MappingRule.objects.exists()  # the preview saved nothing
    shot(page, "rule_preview")

    page.click("#create-rule")
    page.wait_for_url(re.compile(r"/rules/#rule-\d+$"))
    rule = MappingRule.objects.get(workspace=tenant.workspace)
    job = ReprocessingJob.objects.get(rule=rule)
    if job.status != "done":  # queued for a worker (PostgreSQL and Redis): run it here
        run_reprocessing_job(job.pk)
    usage = Usage.objects.filter(rule=rule)
    assert str(usage.count()) == shown["matched"]
    assert f"{usage.aggregate(total=Sum('amount'))['total'].normalize():f}" == shown["amount"]
    assert str(usage.values("user").distinct().count()) == shown["users"]

    page.goto("/audit/")
    created = page.locator("#audit tr[data-action='rule.create']")
    assert created.count() == 1 and "user:ada" in created.inner_text() and f"rule {rule.pk}" in created.inner_text()
