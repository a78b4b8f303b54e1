"""Entitlements in a real browser (Debian's chromium through Playwright): create a package with
its feature rows, publish it, subscribe a user, record usage through the API and watch the
period bar and the check's reason follow; then cancel. The three pages fit a 390 px phone.

Screenshots go where tests/test_dashboard_browser.py puts them (KANA_SCREENSHOTS_DIR).
"""

import re

import pytest

from entitlements.models import Package, Subscription
from features.models import FeatureType
from features.services import feature_create
from tests import test_dashboard_browser as base
from tests.api_support import ApiClient
from tests.entitlement_support import consume
from users.models import EndUser

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}
tenant, admin, analytics = base.tenant, base.admin, base.analytics
shot, sign_in = base.shot, base.sign_in


def meter(page, feature: str) -> dict:
    row = page.locator(f'#entitlements .meter-row[data-feature="{feature}"]')
    return {
        "reason": row.get_attribute("data-reason"),
        "words": row.locator(".js-reason").inner_text(),
        "usage": row.locator(".js-usage").inner_text() if row.locator(".js-usage").count() else "",
        "width": row.locator(".meter > span").evaluate("e => e.style.width") if row.locator(".meter").count() else "",
    }


def test_create_publish_subscribe_and_watch_the_bar_follow_usage(page, live_server, tenant, admin, analytics):
    feature_create(workspace=tenant.workspace, key="messages", name="Messages")
    feature_create(workspace=tenant.workspace, key="sso", name="SSO", type=FeatureType.BINARY)
    analytics.identify("u-123", {"name": "Grace", "email": "grace@example.com"})
    sign_in(page)

    page.click("nav >> text=Packages")
    page.wait_for_url(re.compile(r"/packages/$"))
    assert "No packages yet" in page.inner_text("#packages-table")
    # A refusal comes back in the form, with what was typed kept.
    page.fill("#id_key", "pro")
    page.fill("#id_name", "Pro")
    page.select_option("#id_features-0-feature", "messages")
    page.fill("#id_features-0-limit", "5")
    page.select_option("#id_features-1-feature", "sso")
    page.fill("#id_features-1-limit", "1")
    page.select_option("#id_features-1-reset_period", "never")
    page.click("#package-form button[type=submit]")
    assert "leave the limit empty" in page.inner_text("#feature-rows")
    assert page.input_value("#id_features-0-limit") == "5"
    shot(page, "package_error")
    page.fill("#id_features-1-limit", "")
    page.click("#package-form button[type=submit]")
    page.wait_for_url(re.compile(r"/packages/\d+/$"))
    assert page.inner_text("#package-status") == "draft"
    assert "Draft package pro created" in page.inner_text(".messages")

    page.click("#publish")
    page.wait_for_url(re.compile(r"/packages/\d+/$"))
    assert page.inner_text("#package-status") == "published"
    assert not page.locator("#publish").count() and not page.locator("#id_features-0-feature").count()
    shot(page, "package")
    page.goto("/packages/")
    shot(page, "packages")

    user = EndUser.objects.get(workspace=tenant.workspace, user_id="u-123")
    page.goto(f"/users/{user.pk}/")
    page.click("#plan-link")
    page.wait_for_url(re.compile(rf"/users/{user.pk}/entitlements/$"))
    assert "No subscription" in page.inner_text("#no-entitlements")
    page.select_option("#id_package", label="Pro (pro)")
    page.click("#subscribe-form button[type=submit]")
    page.wait_for_url(re.compile(rf"/users/{user.pk}/entitlements/$"))
    assert "Subscribed to pro (active)." in page.inner_text(".messages")
    assert meter(page, "messages") == {
        "reason": "within_limit",
        "words": "Within the limit",
        "usage": "0 used of 5 · 5 left",
        "width": "0%",
    }
    assert meter(page, "sso")["words"] == "Access: an on/off feature included in a live package"

    for n in range(3):  # usage through the API, as the product records it
        assert consume(tenant, "u-123", "messages", f"send-{n}").json()["access"] is True
    page.reload()
    assert meter(page, "messages")["usage"] == "3 used of 5 · 2 left"
    assert meter(page, "messages")["width"] == "60%"
    response = ApiClient(tenant).post(
        "usage/records",
        {"user_id": "u-123", "feature": "messages", "delta": 2, "idempotency_key": "bulk-1"},
    )
    assert response.status_code in (200, 201), response.content
    page.reload()
    assert meter(page, "messages") == {
        "reason": "limit_reached",
        "words": "Limit reached: the next unit is refused",
        "usage": "5 used of 5 · 0 left",
        "width": "100%",
    }
    assert page.locator('.meter-row[data-feature="messages"] .meter.refused').count() == 1  # drawn red
    assert consume(tenant, "u-123", "messages", "send-refused").json()["access"] is False
    shot(page, "user_entitlements")

    subscription = Subscription.objects.get(workspace=tenant.workspace, user=user)
    page.click(f'tr[data-subscription="{subscription.pk}"] >> text=Cancel subscription')
    page.wait_for_url(re.compile(rf"/users/{user.pk}/entitlements/$"))
    assert "Subscription to pro cancelled." in page.inner_text(".messages")
    assert meter(page, "messages")["words"] == "Subscription inactive (none active or trialing)"
    assert meter(page, "messages")["usage"] == ""  # no budget read: no bar

    # The three pages fit a phone.
    phone = page.context.browser.new_context(viewport=PHONE, base_url=live_server.url, is_mobile=True, has_touch=True)
    phone.set_default_timeout(15_000)
    small = phone.new_page()
    try:
        sign_in(small)
        package = Package.objects.get(workspace=tenant.workspace, key="pro")
        for url in ("/packages/", f"/packages/{package.pk}/", f"/users/{user.pk}/entitlements/"):
            small.goto(url)
            width = small.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"{url} is {width}px wide"
        shot(small, "phone_user_entitlements")
    finally:
        phone.close()
