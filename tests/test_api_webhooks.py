"""/api/v1/webhooks: endpoints with a secret shown once, their audit rows, their deliveries'
log, and tenancy (SPEC §11 "Webhooks")."""

import pytest

from kana.models import AuditEntry
from kana.signals import notification
from webhooks.models import WebhookEndpoint

from .api_support import ApiClient, assert_error, assert_page
from .webhook_support import create_endpoint

URL = "https://hooks.example.com/kana"


@pytest.fixture
def api(tenant) -> ApiClient:
    return ApiClient(tenant)


def test_it_creates_an_endpoint_and_shows_the_secret_once(api):
    created = create_endpoint(api, URL, ["user.merged", "usage.threshold_reached"], thresholds=[1, 0.5])

    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 30
    assert created["url"] == URL and created["active"] is True
    assert created["events"] == ["usage.threshold_reached", "user.merged"]  # known order, no repeats
    assert created["thresholds"] == [0.5, 1.0]
    detail = api.get(f"webhooks/{created['id']}").json()
    listed = assert_page(api.get("webhooks").json())
    assert "secret" not in detail and all("secret" not in row for row in listed)
    assert detail == {name: value for name, value in created.items() if name != "secret"}


def test_thresholds_default_to_eighty_and_hundred_percent(api):
    assert create_endpoint(api, URL)["thresholds"] == [0.8, 1.0]


@pytest.mark.parametrize(
    "url", ["ftp://example.com/hook", "file:///etc/passwd", "javascript:alert(1)", "example.com/hook", "http://"]
)
def test_it_refuses_urls_that_are_not_http(api, url):
    response = api.post("webhooks", {"url": url, "events": ["user.merged"]})
    assert_error(response, 400, "invalid_url", "url")
    assert not WebhookEndpoint.objects.exists()


def test_it_refuses_a_blank_url_as_the_schema_says(api):
    response = api.post("webhooks", {"url": "", "events": ["user.merged"]})
    assert_error(response, 400, "invalid_request", "url")
    assert not WebhookEndpoint.objects.exists()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://localhost/hook",
        "http://LOCALHOST./hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/hook",
        "http://[::1]/hook",
        "http://[::ffff:192.168.0.1]/hook",
    ],
)
def test_it_refuses_private_and_local_addresses(api, settings, url):
    assert not settings.KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES, "production's default"
    assert_error(api.post("webhooks", {"url": url, "events": ["user.merged"]}), 400, "invalid_url", "url")

    settings.KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True  # a development setup's receiver
    assert api.post("webhooks", {"url": url, "events": ["user.merged"]}).status_code == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": URL, "events": []}, "events"),
        ({"url": URL, "events": ["user.deleted"]}, "events"),
        ({"url": URL, "events": ["user.merged"], "thresholds": [0]}, "thresholds"),
        ({"url": URL, "events": ["user.merged"], "thresholds": [1.5]}, "thresholds"),
        ({"url": URL, "events": ["user.merged"], "thresholds": ["0.8"]}, "thresholds"),
        ({"url": 5, "events": ["user.merged"]}, "url"),
    ],
)
def test_it_refuses_bad_events_and_thresholds(api, body, field):
    response = api.post("webhooks", body)
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field


def test_it_changes_and_deletes_an_endpoint_with_an_audit_row_each(api, tenant):
    created = create_endpoint(api, URL)

    changed = api.patch(f"webhooks/{created['id']}", {"active": False, "url": URL + "/v2", "thresholds": [0.9]})
    assert changed.status_code == 200, changed.content
    assert changed.json()["active"] is False and changed.json()["url"] == URL + "/v2"
    assert "secret" not in changed.json()
    assert_error(api.patch(f"webhooks/{created['id']}", {"url": "gopher://x"}), 400, "invalid_url", "url")
    assert_error(api.patch(f"webhooks/{created['id']}", {"secret": "mine"}), 400, "invalid_request", "secret")
    assert api.delete(f"webhooks/{created['id']}").status_code == 204
    assert api.get(f"webhooks/{created['id']}").status_code == 404

    entries = AuditEntry.objects.for_workspace(tenant.workspace).filter(object_type="webhook_endpoint").order_by("pk")
    assert [(e.action, e.object_type, e.object_id) for e in entries] == [
        ("webhook.create", "webhook_endpoint", str(created["id"])),
        ("webhook.update", "webhook_endpoint", str(created["id"])),
        ("webhook.delete", "webhook_endpoint", str(created["id"])),
    ]
    assert entries[1].before["active"] is True and entries[1].after == {
        "url": URL + "/v2",
        "events": created["events"],
        "thresholds": [0.9],
        "active": False,
    }
    assert all(created["secret"] not in str((e.before, e.after)) for e in entries)
    assert entries[0].actor.startswith("api-key:")


def test_another_workspace_sees_nothing(api, tenant, other_tenant):
    created = create_endpoint(api, URL)
    theirs = ApiClient(other_tenant)

    assert assert_page(theirs.get("webhooks").json()) == []
    for path in (f"webhooks/{created['id']}", f"webhooks/{created['id']}/deliveries"):
        assert_error(theirs.get(path), 404, "not_found")
    assert_error(theirs.patch(f"webhooks/{created['id']}", {"active": False}), 404, "not_found")
    assert_error(theirs.delete(f"webhooks/{created['id']}"), 404, "not_found")
    # Their notifications never reach this workspace's endpoint.
    notification.send(None, workspace_id=other_tenant.workspace.pk, event_type="user.merged", data={}, event_key="k1")
    assert assert_page(api.get(f"webhooks/{created['id']}/deliveries").json()) == []
    assert WebhookEndpoint.objects.get(pk=created["id"]).active


def test_the_deliveries_log_reads_a_page_in_a_fixed_number_of_queries(
    api, tenant, settings, tasks_in_process, django_capture_on_commit_callbacks, django_assert_max_num_queries
):
    settings.KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False  # nothing is called: 127.0.0.1 is refused
    created = create_endpoint(api, "http://hooks.invalid/kana")

    def notify(count: int, first: int) -> None:
        for n in range(first, first + count):
            with django_capture_on_commit_callbacks(execute=True):
                notification.send(
                    None, workspace_id=tenant.workspace.pk, event_type="user.merged", data={"n": n}, event_key=f"k{n}"
                )

    notify(2, 0)
    with django_assert_max_num_queries(6) as few:
        page = assert_page(api.get(f"webhooks/{created['id']}/deliveries").json())
    assert [row["event"]["data"]["n"] for row in page] == [1, 0]  # newest first
    assert page[0]["attempts"][0]["error"].startswith("cannot resolve hooks.invalid")
    notify(8, 2)
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert len(assert_page(api.get(f"webhooks/{created['id']}/deliveries").json())) == 10
