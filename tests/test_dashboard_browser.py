"""The dashboard in a real browser (Debian's chromium through Playwright) against a live server.

Events reach Kana the way they do in production: Segment's own Python library posting to the
live server. Screenshots of the main pages are written to var/screenshots/, or to the folder
KANA_SCREENSHOTS_DIR names: `KANA_SCREENSHOTS_DIR=docs/screenshots make test` refreshes the
committed ones (kept out of ordinary runs so a test run leaves the work tree clean).
"""

import os
import re
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import redis
from django.conf import settings
from segment.analytics import Client as SegmentLibrary
from segment.analytics import request as segment_http

from features.models import Event, EventStatus, MappingRule, ReprocessingJob
from features.services import RuleDefinition, feature_create, rule_create
from features.tasks import run_reprocessing_job
from kana.celery import app as celery_app
from tests.conftest import ADMIN_PASSWORD, ROOT, WorkerProcess, make_member, make_tenant, wait_until
from users.models import EndUser, ImportJob, MergeRecord
from users.tasks import run_import

pytestmark = pytest.mark.browser

SCREENSHOTS = ROOT / os.environ.get("KANA_SCREENSHOTS_DIR", "var/screenshots")


def shot(page, name: str, mask: list | None = None) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True, mask=mask or [])


def sign_in(page, username: str = "ada") -> None:
    page.goto("/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/$"))


@pytest.fixture
def analytics(live_server, tenant):
    """Segment's own library, sending synchronously to the live server."""
    yield SegmentLibrary(write_key=tenant.key, host=live_server.url, sync_mode=True, max_retries=0)
    # Its HTTP session keeps a connection alive, and with it a live-server thread waiting.
    segment_http._session.close()


@pytest.fixture
def tenant(transactional_db):
    return make_tenant("Acme")


@pytest.fixture
def admin(tenant):
    return make_member(tenant.workspace, "ada")


def test_sign_in_and_see_the_segment_boxes_count_what_was_sent(page, live_server, tenant, admin, analytics):
    page.goto("/users/")
    page.wait_for_url(re.compile(r"/login/\?next=/users/$"))
    shot(page, "login")

    analytics.identify("u1", {"email": "Jo@Example.com", "name": "Jo", "billingUserId": "cus_JO1"})
    analytics.identify("u2", {"email": "jo@example.com", "name": "Jo Work"})
    analytics.identify("u3", {"email": "sam@example.com", "name": "Sam"})
    analytics.track("u3", "Report Exported", {"format": "pdf"})
    analytics.track("u3", "Report Exported", {"format": "csv"})
    analytics.track("u1", "Invite Sent", {"seats": 2})
    analytics.page("u1", name="Pricing")

    sign_in(page)
    assert page.inner_text("#box-unmapped .count") == "4"
    assert page.inner_text("#box-no-billing .count") == "2"
    assert page.inner_text("#box-same-email .count") == "2"
    assert "Connected: events are arriving." in page.inner_text("#connection-status")
    assert "just now" in page.inner_text("#last-event")  # not "0 minutes ago"
    page.fill("#id_name", "production")
    page.click("#create-key")
    raw_key = page.inner_text("#new-key .secret").strip()
    assert raw_key.startswith("prv_live_")
    shot(page, "segment", mask=[page.locator("#new-key .secret")])  # no key in a committed image

    page.click("#box-no-billing")
    page.wait_for_url(re.compile(r"/users/\?flag=no_billing_id$"))
    rows = page.inner_text("#users-table tbody")
    assert "u2" in rows and "u3" in rows and "u1" not in rows
    shot(page, "users_without_billing")

    page.goto("/")
    page.click("#box-unmapped")
    page.wait_for_url(re.compile(r"/unmapped/$"))
    assert "Report Exported" in page.inner_text("#by-event")
    assert "Viewed Pricing Page" in page.inner_text("#by-event")


def test_merge_two_duplicates_from_the_review_page(page, live_server, tenant, admin, analytics):
    feature_create(workspace=tenant.workspace, key="exports", name="Exports")
    analytics.identify("kim-laptop", {"email": "kim@example.com", "name": "Kim"})
    analytics.identify("kim-phone", {"email": "KIM@example.com", "billingUserId": "cus_KIM"})
    now = datetime.now(UTC)
    for days_ago, delta in [(0, 3), (1, 1), (4, 6), (9, 2), (15, 4), (22, 1)]:
        analytics.track(
            "kim-phone", "Export", {"featureId": "exports", "delta": delta}, timestamp=now - timedelta(days=days_ago)
        )
    analytics.track("kim-laptop", "Export", {"featureId": "exports"}, timestamp=now - timedelta(days=2))
    laptop = EndUser.objects.get(workspace=tenant.workspace, user_id="kim-laptop")

    sign_in(page)
    page.click("text=Duplicates")
    group = page.locator(".duplicate-group", has_text="kim@example.com")
    assert group.locator("input[name=users]:checked").count() == 2
    shot(page, "duplicates")
    group.locator("button", has_text="Preview merge").click()
    page.wait_for_url(re.compile(r"/duplicates/preview/"))
    assert page.inner_text("#result-user-ids") == "kim-laptop, kim-phone"
    assert "cus_KIM" in page.inner_text("#merge-result")
    assert EndUser.objects.filter(workspace=tenant.workspace).count() == 2  # a preview changes nothing
    shot(page, "merge_preview")

    page.click("#confirm-merge")
    page.wait_for_url(re.compile(rf"/users/{laptop.pk}/$"))
    assert "Merged 1 user into" in page.inner_text(".messages")
    ids = page.inner_text("#user-ids")
    assert "kim-laptop" in ids and "kim-phone" in ids
    assert page.inner_text("[data-feature=exports] .js-total") == "18"
    assert "ada" in page.inner_text("#merges")
    shot(page, "user_detail")

    survivor = EndUser.objects.get(workspace=tenant.workspace)
    assert survivor.pk == laptop.pk and survivor.billing_id == "cus_KIM"
    assert MergeRecord.objects.get(survivor_key=laptop.pk).actor == "user:ada"


@contextmanager
def jobs_wait_for_a_runner():
    """Jobs are queued and nobody runs them until the test says so.

    With Redis (PostgreSQL runs) they wait in the broker for a real worker started later;
    without one, eager execution is switched off and they wait in Kombu's in-memory broker.
    """
    eager = celery_app.conf.task_always_eager
    if settings.REDIS_URL:
        redis.Redis.from_url(settings.REDIS_URL).flushdb()
    celery_app.conf.task_always_eager = False
    try:
        yield
    finally:
        celery_app.conf.task_always_eager = eager


def test_create_a_rule_from_the_unmapped_explorer_and_watch_it_reprocess(page, live_server, tenant, admin, analytics):
    if settings.REDIS_URL and "postgresql" not in settings.DATABASES["default"]["ENGINE"]:
        pytest.skip("a worker needs PostgreSQL when REDIS_URL is set")
    for fmt in ("pdf", "pdf", "pdf", "csv"):
        analytics.track("u1", "Report Exported", {"format": fmt, "pages": 3})
    analytics.track("u2", "Invite Sent", {"format": "pdf"})

    sign_in(page)
    page.goto("/features/")
    page.fill("#id_key", "pdf-exports")
    page.fill("#id_name", "PDF exports")
    page.click("#feature-form button[type=submit]")
    assert "pdf-exports" in page.inner_text("#features-table")
    shot(page, "features")

    page.click("text=Unmapped events")
    page.click("#by-event >> text=Report Exported")
    page.wait_for_url(re.compile(r"event=Report"))
    shot(page, "unmapped")
    pdf_row = page.locator("#by-property tr", has=page.locator("td", has_text=re.compile(r"^pdf$")))
    assert pdf_row.locator("td.num").first.inner_text() == "3"
    pdf_row.locator("text=Create a rule from this").click()
    page.wait_for_url(re.compile(r"/rules/new/\?"))
    assert page.input_value("#id_event_name") == "Report Exported"
    assert page.input_value("#id_conditions-0-property") == "format"
    assert page.input_value("#id_conditions-0-value") == "pdf"
    page.select_option("#id_feature", "pdf-exports")
    shot(page, "rule_new")

    with jobs_wait_for_a_runner():
        page.click("#create-rule")
        page.wait_for_url(re.compile(r"/rules/#rule-\d+$"))
        rule = MappingRule.objects.get(workspace=tenant.workspace)
        row = page.locator(f"#rule-{rule.pk}")
        assert row.locator(".js-status").inner_text() == "queued"
        page.evaluate("window.__samePage = true")  # gone if the page were reloaded

        job = ReprocessingJob.objects.get(rule=rule)
        worker = None
        if settings.REDIS_URL:
            worker = WorkerProcess(settings.REDIS_URL).start()
        else:
            run_reprocessing_job(job_id=job.pk)  # what a worker runs, in this process
        try:
            row.locator(".js-status", has_text="done").wait_for(timeout=60_000)
        finally:
            if worker:
                worker.stop()
    assert page.evaluate("window.__samePage") is True
    assert row.locator(".js-scanned").inner_text() == "4"
    assert row.locator(".js-mapped").inner_text() == "3"
    shot(page, "rules")
    mapped = Event.objects.for_workspace(tenant.workspace).filter(status=EventStatus.MAPPED)
    assert mapped.count() == 3


def test_an_admin_of_one_workspace_gets_404_for_another_s(page, live_server, tenant, admin, analytics):
    other = make_tenant("Other Co").workspace
    analytics.identify("mine", {"email": "shared@example.com"})
    feature_create(workspace=other, key="theirs")
    rule = rule_create(workspace=other, definition=RuleDefinition(name="theirs", feature_key="theirs", event_name="X"))
    from users.profile import ProfileChanges
    from users.services import identify_user

    theirs = [
        identify_user(
            workspace=other,
            user_id=uid,
            changes=ProfileChanges(email="shared@example.com"),
            occurred_at=datetime.now(UTC),
        ).user
        for uid in ("their-1", "their-2")
    ]
    mine = EndUser.objects.get(workspace=tenant.workspace, user_id="mine")

    sign_in(page)
    for url in [
        f"/users/{theirs[0].pk}/",
        f"/users/{theirs[0].pk}/delete/",
        f"/rules/{rule.pk}/progress/",
        f"/duplicates/preview/?users={theirs[0].pk}&users={theirs[1].pk}",
        f"/duplicates/preview/?users={mine.pk}&users={theirs[0].pk}",
    ]:
        response = page.goto(url)
        assert response.status == 404, url
        assert "Not found" in page.content()
    assert page.goto(f"/users/{mine.pk}/").status == 200
    page.goto("/users/")
    assert "their-1" not in page.inner_text("#users-table")
    page.goto("/rules/")
    assert "theirs" not in page.inner_text("#rules-table")
    wait_until(lambda: EndUser.objects.filter(workspace=other).count() == 2, timeout=1)


def test_import_a_csv_with_an_error_then_a_clean_one(page, live_server, tenant, admin, analytics, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    analytics.identify("ann", {"email": "ann@example.com", "name": "Ann"})
    analytics.identify("bob", {"email": "bob@example.com", "name": "Bob"})

    def users() -> list[tuple]:
        rows = EndUser.objects.for_workspace(tenant.workspace).order_by("pk")
        return list(rows.values_list("user_id", "name", "email", "billing_id"))

    before = users()
    broken = tmp_path / "billing.csv"
    broken.write_text(
        "kana_id,user_id,name,email,billing_id\n"
        ",ann,,,cus_ANN\n"
        ",bob,,,not a billing id!\n"
        ",,Cara,cara@example.com,cus_CARA\n"
    )
    sign_in(page)
    page.click("text=CSV")
    page.set_input_files("#id_file", str(broken))
    page.click("#import-form button[type=submit]")
    page.wait_for_url(re.compile(r"/csv/imports/\d+/$"))
    assert "1 row with errors: nothing was changed" in page.inner_text("#import-outcome")
    error_row = page.locator("#import-rows tr[data-row='3']")
    assert "error" in error_row.inner_text() and "not a billing id!" in error_row.inner_text()
    assert page.locator("#apply-import").count() == 0
    shot(page, "csv_report_error")
    assert users() == before

    fixed = tmp_path / "billing-fixed.csv"
    fixed.write_text(broken.read_text().replace("not a billing id!", "cus_BOB"))
    page.click("text=CSV")
    page.set_input_files("#id_file", str(fixed))
    # Forced through a worker (any file above one row), to watch the progress page.
    settings.KANA_CSV_INLINE_MAX_ROWS = 1
    with jobs_wait_for_a_runner():
        page.click("#import-form button[type=submit]")
        page.wait_for_url(re.compile(r"/csv/imports/\d+/$"))
        assert page.inner_text("#import-status") == "queued"
        assert page.locator("#import-progress progress").count() == 1
        shot(page, "csv_progress")
        job = ImportJob.objects.get(workspace=tenant.workspace, dry_run=True, status="queued")
        worker = None
        if settings.REDIS_URL:
            worker = WorkerProcess(settings.REDIS_URL, extra_env={"KANA_MEDIA_ROOT": str(tmp_path)}).start()
        else:
            run_import(job_id=job.pk)  # what a worker runs, in this process
        try:
            page.locator("#import-outcome").wait_for(timeout=60_000)  # the page reloads itself when done
        finally:
            if worker:
                worker.stop()
    settings.KANA_CSV_INLINE_MAX_ROWS = 2000
    assert "Dry run: nothing was changed yet." in page.inner_text("#import-outcome")
    counts = page.inner_text("#import-counts")
    assert re.search(r"1\s+created", counts) and re.search(r"2\s+updated", counts)
    assert users() == before
    shot(page, "csv_dry_run")

    page.click("#apply-import")
    page.wait_for_url(re.compile(r"/csv/imports/\d+/$"))
    assert "Applied" in page.inner_text("#import-outcome")
    shot(page, "csv_applied")
    after = {row[0] or row[2]: row[3] for row in users()}
    assert after == {"ann": "cus_ANN", "bob": "cus_BOB", "cara@example.com": "cus_CARA"}
