"""The entitlements pages of the dashboard: packages (create a draft with feature rows, edit,
publish, archive; refusals in the form) and a user's plan (subscribe, change plan, cancel,
period bars with the check's reason). Another workspace's package, user or subscription is a 404."""

import html
import re
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from entitlements import access
from entitlements.models import Package, PackageStatus, Subscription, SubscriptionStatus
from entitlements.services import PackageFeatureSpec, package_create, subscription_create
from features.models import FeatureType
from features.services import feature_create
from kana.models import AuditEntry
from tests.conftest import make_member
from users.models import EndUser
from users.profile import ProfileChanges
from users.services import identify_user


def _user(workspace, user_id):
    return identify_user(
        workspace=workspace, user_id=user_id, changes=ProfileChanges(), occurred_at=timezone.now()
    ).user


@pytest.fixture
def features(tenant):
    feature_create(workspace=tenant.workspace, key="messages", name="Messages")
    feature_create(workspace=tenant.workspace, key="sso", name="SSO", type=FeatureType.BINARY)


def _rows(*rows, total=None) -> dict:
    """The package form's feature rows as posted: (feature, limit, overage, reset_period)."""
    data = {"features-TOTAL_FORMS": str(total or len(rows)), "features-INITIAL_FORMS": "0"}
    for index, (feature, limit, overage, reset) in enumerate(rows):
        data.update({f"features-{index}-feature": feature, f"features-{index}-limit": limit})
        data[f"features-{index}-reset_period"] = reset
        if overage:
            data[f"features-{index}-overage_enabled"] = "on"
    for index in range(len(rows), total or 0):
        data.update({f"features-{index}-feature": "", f"features-{index}-limit": ""})
        data[f"features-{index}-reset_period"] = "month"
    return data


def _create(client, key="pro", *rows, **fields):
    body = {"key": key, "name": fields.get("name", ""), "is_addon": fields.get("is_addon", "false")}
    body["metadata"] = fields.get("metadata", "")
    return client.post("/packages/", {**body, **_rows(*rows, total=fields.get("total"))})


def _errors(response) -> list[str]:
    found = re.findall(r'<ul class="errorlist[^"]*"[^>]*>(.*?)</ul>', response.content.decode(), re.S)
    return [html.unescape(re.sub(r"<[^>]+>", "", error)) for error in found]


def _pro(tenant, limit="10", *, key="pro", status=PackageStatus.PUBLISHED, is_addon=False):
    return package_create(
        workspace=tenant.workspace,
        key=key,
        status=status,
        is_addon=is_addon,
        features=[
            PackageFeatureSpec("messages", limit=None if limit is None else Decimal(limit)),
            PackageFeatureSpec("sso", reset_period="never"),
        ],
    )


# --- Packages -----------------------------------------------------------------------------


def test_the_packages_page_lists_packages_with_their_features(member_client, tenant, features):
    _pro(tenant)
    package_create(workspace=tenant.workspace, key="extra", is_addon=True, features=[PackageFeatureSpec("messages")])
    page = member_client.get("/packages/").content.decode()
    pro = page.split('data-package="pro"')[1].split("</tr>")[0]
    assert "base" in pro and "published" in pro
    assert "<code>messages</code> · 10 per month" in pro and "<code>sso</code> · included (on/off)" in pro
    extra = page.split('data-package="extra"')[1].split("</tr>")[0]
    assert "add-on" in extra and "draft" in extra and "unlimited per month" in extra
    assert "2 packages." in page
    assert 'href="/packages/"' in member_client.get("/").content.decode()  # the nav link


def test_it_creates_a_draft_with_its_feature_rows_ignoring_blank_ones(member_client, tenant, features, member):
    response = _create(
        member_client,
        "pro",
        ("messages", "500", True, "week"),
        ("", "", False, "month"),
        ("sso", "", False, "never"),
        name="Pro",
        metadata='{"stripe_price": "price_1"}',
    )
    package = Package.objects.for_workspace(tenant.workspace).get(key="pro")
    assert response.status_code == 302 and response["Location"] == f"/packages/{package.pk}/"
    assert (package.name, package.status, package.is_addon, package.metadata) == (
        "Pro",
        "draft",
        False,
        {"stripe_price": "price_1"},
    )
    offers = {pf.feature.key: (pf.limit, pf.overage_enabled, pf.reset_period) for pf in package.features.all()}
    assert offers == {"messages": (Decimal(500), True, "week"), "sso": (None, False, "never")}
    entry = AuditEntry.objects.get(workspace=tenant.workspace, action="package.create")
    assert entry.actor == f"user:{member.username}" and entry.object_id == "pro"


def test_a_refused_package_is_shown_in_the_form_on_its_row(member_client, tenant, features):
    response = _create(member_client, "pro", ("messages", "5", False, "month"), ("sso", "3", False, "never"))
    assert response.status_code == 400
    assert _errors(response) == ["An on/off (BINARY) feature has no limit: leave the limit empty."]
    row = response.content.decode().split('class="feature-row"')[2]  # the second row, sso's
    assert "leave the limit empty" in row
    assert 'value="5"' in response.content.decode()  # what was typed is kept
    assert not Package.objects.for_workspace(tenant.workspace).exists()


@pytest.mark.parametrize(
    ("fields", "rows", "message"),
    [
        ({"key": "no spaces"}, [], "A package id is 1–100 letters, digits, _ . : or -."),
        ({"key": "pro"}, [("messages", "1", False, "month")] * 2, "Each feature appears in a package once"),
        ({"key": "pro", "metadata": "[1]"}, [], "Metadata is a JSON object"),
        ({"key": "pro", "metadata": "{oops"}, [], "Metadata is JSON"),
        ({"key": "pro"}, [("messages", "-1", False, "month")], "A limit is 0 or more"),
        ({"key": "pro"}, [("messages", "ten", False, "month")], "Enter a number."),
        ({"key": "pro"}, [("nope", "", False, "month")], "Select a valid choice."),
    ],
)
def test_bad_packages_are_refused_in_words(member_client, tenant, features, fields, rows, message):
    response = _create(member_client, fields["key"], *rows, metadata=fields.get("metadata", ""))
    assert response.status_code == 400
    assert any(e.startswith(message) for e in _errors(response)), _errors(response)
    assert not Package.objects.for_workspace(tenant.workspace).exists()


def test_a_taken_package_id_is_refused_in_the_form(member_client, tenant, features):
    _pro(tenant)
    response = _create(member_client, "pro")
    assert response.status_code == 400 and _errors(response) == ["A package with id 'pro' already exists"]


def test_a_draft_is_edited_then_published_then_only_its_name_and_metadata_change(member_client, tenant, features):
    package = _pro(tenant, status=PackageStatus.DRAFT)
    page = member_client.get(f"/packages/{package.pk}/").content.decode()
    assert 'id="publish"' in page and 'name="features-0-limit"' in page
    assert 'name="features-TOTAL_FORMS" value="5"' in page  # 2 features + 3 blank rows

    response = member_client.post(
        f"/packages/{package.pk}/",
        {"name": "Pro plan", "is_addon": "false", "metadata": "", **_rows(("messages", "20", False, "day"))},
    )
    assert response.status_code == 302
    package.refresh_from_db()
    assert package.name == "Pro plan"
    assert [(pf.feature.key, pf.limit, pf.reset_period) for pf in package.features.all()] == [
        ("messages", Decimal(20), "day")
    ]

    response = member_client.post(f"/packages/{package.pk}/status/", {"status": "published"}, follow=True)
    assert "Package pro published" in response.content.decode()
    package.refresh_from_db()
    assert package.status == "published"

    page = member_client.get(f"/packages/{package.pk}/").content.decode()
    assert 'id="publish"' not in page and 'id="archive"' in page
    assert "features-TOTAL_FORMS" not in page and 'name="is_addon"' not in page  # features are fixed now
    # Feature rows posted to a published package are refused whole, not dropped silently.
    response = member_client.post(
        f"/packages/{package.pk}/",
        {"name": "Pro 2", "metadata": '{"tier": 2}', **_rows(("messages", "99", False, "day"))},
    )
    assert response.status_code == 409
    package.refresh_from_db()
    assert package.name == "Pro plan"
    response = member_client.post(f"/packages/{package.pk}/", {"name": "Pro 2", "metadata": '{"tier": 2}'})
    assert response.status_code == 302
    package.refresh_from_db()
    assert (package.name, package.metadata) == ("Pro 2", {"tier": 2})
    assert [pf.limit for pf in package.features.all()] == [Decimal(20)]
    actions = list(
        AuditEntry.objects.filter(workspace=tenant.workspace, action__startswith="package.")
        .order_by("pk")
        .values_list("action", flat=True)
    )
    assert actions == ["package.create", "package.update", "package.update", "package.update"]


def test_archive_and_refused_status_changes_say_why(member_client, tenant, features):
    package = _pro(tenant)
    response = member_client.post(f"/packages/{package.pk}/status/", {"status": "archived"}, follow=True)
    assert "Package pro archived." in response.content.decode()
    # Archived cannot be published again: the service's refusal is a message, not a 500.
    response = member_client.post(f"/packages/{package.pk}/status/", {"status": "published"}, follow=True)
    assert response.status_code == 200
    assert "A archived package cannot become published" in response.content.decode()
    response = member_client.post(f"/packages/{package.pk}/status/", {"status": "draft"}, follow=True)
    assert "Choose Publish or Archive." in response.content.decode()
    package.refresh_from_db()
    assert package.status == "archived"


def test_a_package_page_counts_its_subscriptions(member_client, tenant, features):
    package = _pro(tenant)
    user = _user(tenant.workspace, "u1")
    subscription_create(workspace=tenant.workspace, package=package, user=user)
    page = member_client.get(f"/packages/{package.pk}/").content.decode()
    assert "1 subscription" in page and "1 subscriptions" not in page


# --- A user's plan ------------------------------------------------------------------------


def test_a_user_without_subscription_sees_so_and_the_user_page_links_to_the_plan(member_client, tenant, features):
    user = _user(tenant.workspace, "u1")
    assert f'href="/users/{user.pk}/entitlements/"' in member_client.get(f"/users/{user.pk}/").content.decode()
    page = member_client.get(f"/users/{user.pk}/entitlements/").content.decode()
    assert "No subscription: every check answers “no subscription”." in page
    assert "No published package yet" in page


def _meter(page: str, feature: str) -> str:
    return page.split(f'data-feature="{feature}"')[1].split('class="meter-row"')[0]


def test_subscribing_shows_a_bar_per_feature_that_follows_usage(member_client, tenant, features, member):
    user = _user(tenant.workspace, "u1")
    package = _pro(tenant, "3")
    response = member_client.post(
        f"/users/{user.pk}/subscriptions/", {"package": package.pk, "status": "active", "started_at": ""}
    )
    assert response.status_code == 302
    subscription = Subscription.objects.for_workspace(tenant.workspace).get(user=user)
    assert subscription.status == "active" and timezone.now() - subscription.started_at < timezone.timedelta(minutes=1)
    assert AuditEntry.objects.filter(workspace=tenant.workspace, action="subscription.create").get().actor == (
        f"user:{member.username}"
    )

    page = member_client.get(f"/users/{user.pk}/entitlements/").content.decode()
    messages = _meter(page, "messages")
    assert 'data-reason="within_limit"' in page and "Within the limit" in messages
    assert "0 used of 3 · 3 left" in messages and 'style="width:0%"' in messages
    assert "(resets every month)" in messages
    assert "Access: an on/off feature included in a live package" in _meter(page, "sso")

    for n in range(2):
        access.consume(
            tenant.workspace, user_id="u1", feature_key="messages", delta=Decimal(1), idempotency_key=f"k{n}"
        )
    messages = _meter(member_client.get(f"/users/{user.pk}/entitlements/").content.decode(), "messages")
    assert "2 used of 3 · 1 left" in messages and 'style="width:66%"' in messages and "Within the limit" in messages
    access.consume(tenant.workspace, user_id="u1", feature_key="messages", delta=Decimal(1), idempotency_key="k3")
    messages = _meter(member_client.get(f"/users/{user.pk}/entitlements/").content.decode(), "messages")
    assert "3 used of 3 · 0 left" in messages and 'style="width:100%"' in messages
    assert "Limit reached: the next unit is refused" in messages and "badge bad" in messages


def test_overage_draws_the_bar_full_and_says_so(member_client, tenant, features):
    user = _user(tenant.workspace, "u1")
    package = package_create(
        workspace=tenant.workspace,
        key="flex",
        status=PackageStatus.PUBLISHED,
        features=[PackageFeatureSpec("messages", limit=Decimal(2), overage_enabled=True)],
    )
    subscription_create(workspace=tenant.workspace, package=package, user=user)
    access.record_usage(
        tenant.workspace, user_id="u1", feature_key="messages", delta=Decimal("3.5"), action="add", idempotency_key="r1"
    )
    messages = _meter(member_client.get(f"/users/{user.pk}/entitlements/").content.decode(), "messages")
    assert "Over the limit, and the package allows overage" in messages and "badge ok" in messages
    assert "3.5 used of 2" in messages and "left" not in messages
    assert 'class="meter over"' in messages and 'style="width:100%"' in messages


def test_an_unlimited_feature_and_a_started_at_in_the_past(member_client, tenant, features):
    user = _user(tenant.workspace, "u1")
    package = _pro(tenant, None)
    response = member_client.post(
        f"/users/{user.pk}/subscriptions/",
        {"package": package.pk, "status": "trialing", "started_at": "2026-01-15T09:30"},
    )
    assert response.status_code == 302
    subscription = Subscription.objects.for_workspace(tenant.workspace).get(user=user)
    assert subscription.status == "trialing" and subscription.started_at.isoformat() == "2026-01-15T09:30:00+00:00"
    messages = _meter(member_client.get(f"/users/{user.pk}/entitlements/").content.decode(), "messages")
    assert "0 used · unlimited" in messages and "Within the limit" in messages
    start = access.evaluate(
        tenant.workspace,
        access.user_subject(tenant.workspace, user.pk),
        package.features.get(feature__key="messages").feature,
    ).period[0]
    assert start.day == 15 and f"{start:%Y-%m-%d} 09:30 –" in messages


def test_subscribe_refusals_are_shown_in_the_form(member_client, tenant, features):
    user = _user(tenant.workspace, "u1")
    draft = _pro(tenant, key="draft", status=PackageStatus.DRAFT)
    addon = _pro(tenant, key="extra", is_addon=True)
    # An add-on needs a live base package first: the service's words, in the form.
    response = member_client.post(f"/users/{user.pk}/subscriptions/", {"package": addon.pk, "status": "active"})
    assert response.status_code == 400
    assert _errors(response) == ["An add-on needs a live base package first"]
    # A draft is not offered (a crafted post is refused by the form), nor a bad date.
    response = member_client.post(f"/users/{user.pk}/subscriptions/", {"package": draft.pk, "status": "active"})
    assert response.status_code == 400 and _errors(response)[0].startswith("Select a valid choice.")
    response = member_client.post(
        f"/users/{user.pk}/subscriptions/", {"package": addon.pk, "status": "active", "started_at": "soon"}
    )
    assert response.status_code == 400 and "Enter a valid date/time." in _errors(response)
    assert not Subscription.objects.for_workspace(tenant.workspace).exists()


def test_change_plan_then_cancel(member_client, tenant, features):
    user = _user(tenant.workspace, "u1")
    pro, team = _pro(tenant, "3"), _pro(tenant, "100", key="team")
    subscription = subscription_create(workspace=tenant.workspace, package=pro, user=user)
    url = f"/users/{user.pk}/subscriptions/{subscription.pk}/"
    prefix = f"s{subscription.pk}"
    response = member_client.post(url, {f"{prefix}-package": team.pk, f"{prefix}-status": "active"}, follow=True)
    assert "Subscription saved: team, active." in response.content.decode()
    assert "0 used of 100" in _meter(response.content.decode(), "messages")
    subscription.refresh_from_db()
    assert subscription.package_id == team.pk

    response = member_client.post(url, {f"{prefix}-status": "past_due"}, follow=True)
    assert "Subscription inactive (none active or trialing)" in _meter(response.content.decode(), "messages")

    response = member_client.post(url, {f"{prefix}-package": pro.pk, "cancel": "1"}, follow=True)
    page = response.content.decode()
    assert "Subscription to team cancelled." in page
    subscription.refresh_from_db()
    assert subscription.status == SubscriptionStatus.CANCELLED and subscription.package_id == team.pk
    assert "Cancel subscription" not in page  # a cancelled subscription has no form
    # A cancelled subscription stays cancelled: refused in words.
    response = member_client.post(url, {f"{prefix}-status": "active"}, follow=True)
    assert "A cancelled subscription stays cancelled" in response.content.decode()
    # A change to another kind is refused in words too.
    addon = _pro(tenant, key="extra", is_addon=True)
    second = subscription_create(workspace=tenant.workspace, package=team, user=user)
    response = member_client.post(
        f"/users/{user.pk}/subscriptions/{second.pk}/", {f"s{second.pk}-package": addon.pk}, follow=True
    )
    assert "A base package changes to a base package, an add-on to an add-on" in response.content.decode()


def test_a_groups_subscription_is_shown_read_only(member_client, tenant, features, segment):
    segment.identify("u1", {})
    assert segment.post("/v1/group", {"userId": "u1", "groupId": "acme", "traits": {}}).status_code == 200
    user = EndUser.objects.for_workspace(tenant.workspace).get(identities__external_id="u1")
    from users.models import Group

    group = Group.objects.for_workspace(tenant.workspace).get(group_id="acme")
    subscription = subscription_create(workspace=tenant.workspace, package=_pro(tenant, "7"), group=group)
    page = member_client.get(f"/users/{user.pk}/entitlements/").content.decode()
    assert "group <code>acme</code>" in page and "the group's: change it through the API" in page
    assert "0 used of 7" in _meter(page, "messages")
    response = member_client.post(f"/users/{user.pk}/subscriptions/{subscription.pk}/", {"cancel": "1"})
    assert response.status_code == 404  # not the user's own: changed for the group


# --- Tenancy and access -------------------------------------------------------------------


def test_another_workspaces_package_user_and_subscription_are_404(member_client, tenant, other_tenant, features):
    feature_create(workspace=other_tenant.workspace, key="messages")
    theirs = package_create(
        workspace=other_tenant.workspace,
        key="theirs",
        status=PackageStatus.PUBLISHED,
        features=[PackageFeatureSpec("messages", limit=Decimal(1))],
    )
    their_user = _user(other_tenant.workspace, "u1")
    their_subscription = subscription_create(workspace=other_tenant.workspace, package=theirs, user=their_user)
    mine = _user(tenant.workspace, "u1")
    assert "theirs" not in member_client.get("/packages/").content.decode()
    assert member_client.get(f"/packages/{theirs.pk}/").status_code == 404
    assert member_client.post(f"/packages/{theirs.pk}/", {"name": "x"}).status_code == 404
    assert member_client.post(f"/packages/{theirs.pk}/status/", {"status": "archived"}).status_code == 404
    assert member_client.get(f"/users/{their_user.pk}/entitlements/").status_code == 404
    assert member_client.post(f"/users/{their_user.pk}/subscriptions/", {"package": theirs.pk}).status_code == 404
    assert (
        member_client.post(f"/users/{mine.pk}/subscriptions/{their_subscription.pk}/", {"cancel": "1"}).status_code
        == 404
    )
    # Their package is no choice for my user either.
    response = member_client.post(f"/users/{mine.pk}/subscriptions/", {"package": theirs.pk, "status": "active"})
    assert response.status_code == 400
    theirs.refresh_from_db()
    their_subscription.refresh_from_db()
    assert theirs.status == "published" and their_subscription.status == "active"
    assert not Subscription.objects.for_workspace(tenant.workspace).exists()


def test_the_pages_need_sign_in_and_csrf(client, tenant, features):
    package = _pro(tenant)
    user = _user(tenant.workspace, "u1")
    for url in ("/packages/", f"/packages/{package.pk}/", f"/users/{user.pk}/entitlements/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(make_member(tenant.workspace, "grace"))
    assert strict.get("/packages/").status_code == 200
    assert strict.post(f"/packages/{package.pk}/status/", {"status": "archived"}).status_code == 403
    assert strict.post(f"/users/{user.pk}/subscriptions/", {"package": package.pk}).status_code == 403
    package.refresh_from_db()
    assert package.status == "published"


def test_a_held_reservation_fills_the_bar_and_is_named(member_client, tenant, features):
    user = _user(tenant.workspace, "u1")
    subscription_create(workspace=tenant.workspace, package=_pro(tenant, "10"), user=user)
    access.consume(tenant.workspace, user_id="u1", feature_key="messages", delta=Decimal(2), idempotency_key="c1")
    access.reservation_create(
        tenant.workspace, user_id="u1", feature_key="messages", amount=Decimal(6), ttl_seconds=600, idempotency_key="h1"
    )
    messages = _meter(member_client.get(f"/users/{user.pk}/entitlements/").content.decode(), "messages")
    assert "2 used of 10 · 2 left · 6 held by reservations" in messages and 'style="width:80%"' in messages


def test_a_draft_published_while_its_form_was_open_refuses_the_edit_in_the_form(member_client, tenant, features):
    from entitlements.services import package_update

    package = _pro(tenant, status=PackageStatus.DRAFT)
    assert 'name="features-TOTAL_FORMS"' in member_client.get(f"/packages/{package.pk}/").content.decode()
    package_update(workspace=tenant.workspace, package=package, changes={"status": "published"})
    response = member_client.post(
        f"/packages/{package.pk}/",
        {"name": "Pro", "is_addon": "false", "metadata": "", **_rows(("messages", "99", False, "day"))},
    )
    # Its rows are not dropped silently: nothing is saved, and the form says why.
    assert response.status_code == 409
    assert _errors(response) == [
        "Package pro was published meanwhile: its features and kind no longer change, so nothing was saved."
        " Its name and metadata still can."
    ]
    assert 'value="Pro"' in response.content.decode()  # the typed name is kept for a second try
    package.refresh_from_db()
    assert package.name == "pro" and [pf.limit for pf in package.features.all() if pf.feature.key == "messages"] == [
        Decimal(10)
    ]
