"""Notifications become signed webhook deliveries (SPEC §11 "Webhooks").

Every test talks to a real HTTP receiver (``tests.webhook_support.Receiver``) that checks the
signature with the secret the creation answer showed. Retries wait for real, made short by
settings (KANA_WEBHOOK_BACKOFF_BASE_SECONDS), never by mocking the clock.
"""

import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.utils import timezone

from kana.models import AuditEntry
from kana.signals import notification
from users.models import MergeRecord
from webhooks import delivery
from webhooks.delivery import Answer
from webhooks.models import DeliveryAttempt, DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookEvent

from .api_support import ApiClient, assert_page, bare_user, identify
from .conftest import requires_broker, requires_postgres, wait_until
from .webhook_support import Receiver, Reply, create_endpoint, verify_signature


@pytest.fixture(autouse=True)
def loopback_receivers(settings):
    """The tests' receivers listen on 127.0.0.1, an address production refuses to call."""
    settings.KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True


@pytest.fixture
def short_backoff(settings):
    settings.KANA_WEBHOOK_BACKOFF_BASE_SECONDS = 1
    settings.KANA_WEBHOOK_BACKOFF_MAX_SECONDS = 2
    settings.KANA_WEBHOOK_TIMEOUT_SECONDS = 5
    return settings


@pytest.fixture
def api(tenant) -> ApiClient:
    return ApiClient(tenant)


@pytest.fixture
def notify(tenant, tasks_in_process, django_capture_on_commit_callbacks):
    """Send a notification in a transaction of its own; its deliveries' tasks run at commit."""

    def send(event_key: str, event_type: str = "usage.limit_reached", data: dict | None = None, workspace=None):
        with django_capture_on_commit_callbacks(execute=True):
            with transaction.atomic():
                notification.send(
                    None,
                    workspace_id=(workspace or tenant.workspace).pk,
                    event_type=event_type,
                    data=data if data is not None else {"user_id": "u1", "feature": "exports"},
                    event_key=event_key,
                )

    return send


def sweep_until(predicate, timeout: float = 20) -> None:
    """What Celery beat does every few seconds: attempt the due deliveries, until ``predicate``."""

    def swept():
        delivery.send_due(time_budget_seconds=5)
        return predicate()

    wait_until(swept, timeout=timeout, interval=0.1, message="the sweep to move the deliveries on")


def only_delivery() -> WebhookDelivery:
    (found,) = WebhookDelivery.objects.all()
    return found


def test_a_failed_delivery_is_retried_and_every_attempt_is_signed(api, notify, short_backoff):
    with Receiver(Reply(500, "boom"), Reply(200, "thanks")) as receiver:
        endpoint = create_endpoint(api, receiver.url, ["usage.limit_reached"])
        notify("limit:u1:exports:2025-01", data={"user_id": "u1", "feature": "exports", "used": 500})

        # The first attempt ran at commit and failed: the retry waits for the backoff.
        assert len(receiver.requests) == 1
        first = only_delivery()
        assert (first.status, first.attempt_count, first.last_status_code) == ("pending", 1, 500)
        wait = (first.next_attempt_at - timezone.now()).total_seconds()
        assert 0 < wait <= 1, "the first retry waits between half and all of the base backoff"

        sweep_until(lambda: only_delivery().status == DeliveryStatus.DELIVERED)

    assert len(receiver.requests) == 2
    for request in receiver.requests:
        assert request.path == "/hooks"
        assert request.headers["Content-Type"] == "application/json"
        assert verify_signature(endpoint["secret"], request.headers["Kana-Signature"], request.body)
        assert not verify_signature(endpoint["secret"] + "x", request.headers["Kana-Signature"], request.body)
        assert not verify_signature(endpoint["secret"], request.headers["Kana-Signature"], request.body + b" ")
    first_body, retry_body = (request.json for request in receiver.requests)
    assert first_body == retry_body, "a retry carries the same event id for the receiver's dedup"
    assert set(first_body) == {"id", "type", "created", "data"}
    assert first_body["type"] == "usage.limit_reached"
    assert first_body["data"] == {"user_id": "u1", "feature": "exports", "used": 500}
    assert first_body["id"] == WebhookEvent.objects.get().pk

    (listed,) = assert_page(api.get(f"webhooks/{endpoint['id']}/deliveries").json())
    assert listed["status"] == "delivered" and listed["attempt_count"] == 2 and listed["next_attempt_at"] is None
    assert listed["event"]["id"] == first_body["id"] and listed["event"]["data"] == first_body["data"]
    assert [(a["number"], a["status_code"], a["response"]) for a in listed["attempts"]] == [
        (1, 500, "boom"),
        (2, 200, "thanks"),
    ]
    assert all(a["duration_ms"] >= 0 and a["error"] == "" for a in listed["attempts"])


def test_the_same_event_key_notified_twice_is_delivered_once(api, notify):
    with Receiver() as receiver:
        create_endpoint(api, receiver.url, ["usage.limit_reached"])
        notify("limit:u1:exports:2025-01")
        notify("limit:u1:exports:2025-01", data={"something": "else"})
        notify("limit:u1:exports:2025-02")

    assert [r.json["data"].get("something") for r in receiver.requests] == [None, None]
    assert WebhookEvent.objects.count() == 2 and WebhookDelivery.objects.count() == 2


def test_a_rolled_back_transaction_sends_nothing(api, tenant, tasks_in_process, django_capture_on_commit_callbacks):
    with Receiver() as receiver:
        create_endpoint(api, receiver.url, ["subscription.updated"])
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            with pytest.raises(RuntimeError), transaction.atomic():
                notification.send(
                    None,
                    workspace_id=tenant.workspace.pk,
                    event_type="subscription.updated",
                    data={"id": 1, "status": "active"},
                    event_key="subscription:1:v2",
                )
                raise RuntimeError("the change that notified failed")

    assert callbacks == [] and receiver.requests == []
    assert not WebhookEvent.objects.exists() and not WebhookDelivery.objects.exists()


def test_a_real_merge_sends_user_merged_with_both_ids(
    api, tenant, tasks_in_process, django_capture_on_commit_callbacks
):
    survivor, absorbed = identify(tenant, "u-old"), identify(tenant, "u-new")
    with Receiver() as receiver:
        endpoint = create_endpoint(api, receiver.url, ["user.merged"])
        with django_capture_on_commit_callbacks(execute=True):
            response = api.post("users/merge", {"user_ids": [survivor.pk, absorbed.pk]})
        assert response.status_code == 200, response.content
        with django_capture_on_commit_callbacks(execute=True):
            assert api.post("users/merge", {"user_ids": [survivor.pk, absorbed.pk]}).json()["already_merged"]

    (request,) = receiver.requests
    assert verify_signature(endpoint["secret"], request.headers["Kana-Signature"], request.body)
    merge = MergeRecord.objects.get()
    assert request.json["type"] == "user.merged"
    assert request.json["data"] == {
        "merge_id": merge.pk,
        "survivor_id": survivor.pk,
        "absorbed_id": absorbed.pk,
        "absorbed_user_ids": ["u-new"],
        "reason": "admin",
    }


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_an_identify_merge_sends_user_merged_once_its_transaction_committed(api, tenant, tasks_in_process, monkeypatch):
    # Outside any transaction, as in production: the identify's transaction starts pipelined
    # and becomes Django's atomic when its first read shows the merge (kana.db.pipelined.atomic);
    # the delivery's task must still wait for the commit.
    from kana import jobs
    from kana.db import pipelined

    enqueued_in_transaction = []
    enqueue = jobs.enqueue

    def noting(task_name, job_id):
        enqueued_in_transaction.append(connection.in_atomic_block or pipelined.in_transaction())
        return enqueue(task_name, job_id)

    monkeypatch.setattr(jobs, "enqueue", noting)
    survivor = identify(tenant, "u-merging", name="Merging")
    absorbed = bare_user(tenant, "bare@example.com")
    with Receiver() as receiver:
        endpoint = create_endpoint(api, receiver.url, ["user.merged"])
        assert identify(tenant, "u-merging", email="bare@example.com").pk == survivor.pk

    assert enqueued_in_transaction == [False]
    (request,) = receiver.requests
    assert verify_signature(endpoint["secret"], request.headers["Kana-Signature"], request.body)
    merge = MergeRecord.objects.get()
    assert request.json["data"] == {
        "merge_id": merge.pk,
        "survivor_id": survivor.pk,
        "absorbed_id": absorbed.pk,
        "absorbed_user_ids": [],
        "reason": "identify",
    }


def test_a_threshold_reaches_only_the_endpoints_that_asked_for_it(api, notify):
    with Receiver() as receiver:
        create_endpoint(api, receiver.url + "/eighty", ["usage.threshold_reached"], thresholds=[0.8])
        create_endpoint(api, receiver.url + "/full", ["usage.threshold_reached", "usage.limit_reached"], thresholds=[1])
        create_endpoint(api, receiver.url + "/merges", ["user.merged"])
        paused = create_endpoint(api, receiver.url + "/paused", ["usage.threshold_reached"], thresholds=[0.8])
        api.patch(f"webhooks/{paused['id']}", {"active": False})

        notify("u1:exports:2025-01:0.8", "usage.threshold_reached", {"threshold": 0.8, "feature": "exports"})
        notify("u1:exports:2025-01:0.9", "usage.threshold_reached", {"threshold": 0.9, "feature": "exports"})
        notify("u1:exports:2025-01:1.0", "usage.threshold_reached", {"threshold": 1.0, "feature": "exports"})
        notify("u1:exports:2025-01:limit", "usage.limit_reached", {"feature": "exports"})
        # A Decimal (a stored threshold as entitlements keeps it) matches too.
        notify("u2:exports:2025-01:0.8", "usage.threshold_reached", {"threshold": Decimal("0.8000"), "u": 2})
        with pytest.raises(ValueError):
            notify("u3:exports:2025-01:?", "usage.threshold_reached", {"feature": "exports"})

    got = sorted((r.path, r.json["type"], float(r.json["data"].get("threshold") or 0)) for r in receiver.requests)
    assert got == [
        ("/hooks/eighty", "usage.threshold_reached", 0.8),
        ("/hooks/eighty", "usage.threshold_reached", 0.8),
        ("/hooks/full", "usage.limit_reached", 0),
        ("/hooks/full", "usage.threshold_reached", 1.0),
    ]
    # Nobody wanted 0.9: nothing is stored for it.
    assert WebhookEvent.objects.count() == 4


def test_a_delivery_that_never_succeeds_fails_after_the_retry_window(api, notify, short_backoff):
    short_backoff.KANA_WEBHOOK_RETRY_WINDOW_SECONDS = 2
    with Receiver(Reply(503, "down")) as receiver:
        create_endpoint(api, receiver.url)
        notify("limit:u1")
        sweep_until(lambda: only_delivery().status == DeliveryStatus.FAILED)

    failed = only_delivery()
    assert failed.next_attempt_at is None and failed.attempt_count == len(receiver.requests) >= 2
    assert failed.last_status_code == 503 and failed.last_response == "down"
    assert DeliveryAttempt.objects.filter(delivery=failed).count() == failed.attempt_count


def test_a_redirect_is_not_followed(api, notify):
    with Receiver() as elsewhere, Receiver(Reply(302, "", headers={"Location": elsewhere.url})) as receiver:
        create_endpoint(api, receiver.url)
        notify("limit:u1")

    assert len(receiver.requests) == 1 and elsewhere.requests == []
    assert (only_delivery().status, only_delivery().last_status_code) == ("pending", 302)


def test_a_slow_endpoint_times_out_and_is_retried_later(api, notify, short_backoff):
    short_backoff.KANA_WEBHOOK_TIMEOUT_SECONDS = 1
    with Receiver(Reply(200, delay=3)) as receiver:
        create_endpoint(api, receiver.url)
        started = time.monotonic()
        notify("limit:u1")
        assert time.monotonic() - started < 2.5

    slow = only_delivery()
    assert slow.status == "pending" and slow.last_status_code is None and "timed out" in slow.last_error
    assert DeliveryAttempt.objects.get().duration_ms >= 1000


def test_a_refused_connection_is_an_error_not_a_crash(api, notify):
    with Receiver() as receiver:
        url = receiver.url
    create_endpoint(api, url)  # nothing listens there any more
    notify("limit:u1")
    refused = only_delivery()
    assert refused.status == "pending" and refused.last_status_code is None and refused.last_error


def test_a_name_that_resolves_to_a_private_address_is_not_called(api, notify, settings):
    with Receiver() as receiver:
        create_endpoint(api, receiver.url.replace("127.0.0.1", "localhost"))
        settings.KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False  # production's default
        notify("limit:u1")

    assert receiver.requests == []
    refused = only_delivery()
    assert refused.status == "pending" and refused.last_status_code is None
    assert refused.last_error.startswith("refused: localhost resolves to "), refused.last_error


def test_a_delivery_whose_message_was_lost_is_sent_by_the_sweep(api, tenant, django_capture_on_commit_callbacks):
    """Redis down at commit, or a worker killed before it acknowledged: the row is still due."""
    with Receiver() as receiver:
        create_endpoint(api, receiver.url)
        with django_capture_on_commit_callbacks(execute=False), transaction.atomic():  # the message never goes
            notification.send(
                None, workspace_id=tenant.workspace.pk, event_type="usage.limit_reached", data={}, event_key="k"
            )
        assert receiver.requests == [] and only_delivery().status == "pending"
        sweep_until(lambda: only_delivery().status == DeliveryStatus.DELIVERED)

    assert len(receiver.requests) == 1


def test_a_deactivated_endpoint_gets_no_pending_delivery(
    api, tenant, tasks_in_process, django_capture_on_commit_callbacks
):
    with Receiver() as receiver:
        endpoint = create_endpoint(api, receiver.url)
        with django_capture_on_commit_callbacks(execute=False) as callbacks, transaction.atomic():
            notification.send(
                None, workspace_id=tenant.workspace.pk, event_type="usage.limit_reached", data={}, event_key="k"
            )
        api.patch(f"webhooks/{endpoint['id']}", {"active": False})
        for callback in callbacks:
            callback()

    assert receiver.requests == []
    stopped = only_delivery()
    assert (stopped.status, stopped.attempt_count, stopped.last_error) == ("failed", 0, "the endpoint was deactivated")


def test_an_attempt_overtaken_after_its_lease_records_nothing(api, notify, settings):
    settings.KANA_WEBHOOK_BACKOFF_BASE_SECONDS = 3600
    with Receiver(Reply(500, "first")) as receiver:
        create_endpoint(api, receiver.url)
        notify("limit:u1")
    pending = only_delivery()
    WebhookDelivery.objects.filter(pk=pending.pk).update(next_attempt_at=timezone.now())  # the retry is due

    hung = delivery.claim()
    assert hung.attempt == 2 and delivery.claim() is None, "claimed: nobody else sees it due"
    # The hung worker's lease lapses; another worker takes the delivery over.
    WebhookDelivery.objects.filter(pk=pending.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    takeover = delivery.claim()
    assert takeover.attempt == 3

    late = Answer(status_code=200, excerpt="late", error="", duration_ms=60_000)
    assert delivery.record(hung, late) == "pending"
    assert delivery.record(takeover, Answer(status_code=200, excerpt="ok", error="", duration_ms=5)) == "delivered"
    assert [(a.number, a.response_excerpt) for a in DeliveryAttempt.objects.order_by("number")] == [
        (1, "first"),
        (3, "ok"),
    ]


@requires_postgres
def test_parallel_sweeps_never_claim_one_attempt_twice(transactional_db, tenant, tasks_in_process, settings):
    """Four connections claim at once (SELECT … FOR UPDATE SKIP LOCKED): every due delivery
    is claimed exactly once."""
    settings.KANA_WEBHOOK_BACKOFF_BASE_SECONDS = 3600
    with Receiver(Reply(500)) as receiver:
        create_endpoint(ApiClient(tenant), receiver.url)
        for n in range(40):
            with transaction.atomic():
                notification.send(
                    None,
                    workspace_id=tenant.workspace.pk,
                    event_type="usage.limit_reached",
                    data={"n": n},
                    event_key=f"k{n}",
                )
    WebhookDelivery.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    start, claimed, errors = threading.Barrier(4), [], []

    def sweep():
        try:
            start.wait()
            while (found := delivery.claim()) is not None:
                claimed.append(found.delivery_id)
        except Exception as error:  # reported below: a thread's exception is otherwise lost
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sorted(claimed) == sorted(WebhookDelivery.objects.values_list("pk", flat=True))
    assert len(claimed) == 40
    assert set(WebhookDelivery.objects.values_list("attempt_count", flat=True)) == {2}


@requires_broker
def test_retries_survive_a_worker_killed_between_attempts(workers, tenant):
    """A real worker sends the first attempt; it is killed; a new worker's sweep sends the retry."""
    import redis
    from django.conf import settings

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    backoff = {
        "KANA_WEBHOOK_BACKOFF_BASE_SECONDS": 2,
        "KANA_WEBHOOK_BACKOFF_MAX_SECONDS": 2,
        "KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": 1,
    }
    with Receiver(Reply(500, "busy"), Reply(200, "ok")) as receiver:
        endpoint = create_endpoint(ApiClient(tenant), receiver.url)
        first = workers(**backoff)
        with transaction.atomic():
            notification.send(
                None, workspace_id=tenant.workspace.pk, event_type="usage.limit_reached", data={}, event_key="k"
            )
        wait_until(lambda: len(receiver.requests) == 1, timeout=60, message="the first attempt")
        wait_until(lambda: only_delivery().attempt_count == 1 and only_delivery().last_status_code == 500, timeout=10)
        first.kill()

        second = workers(**backoff)
        wait_until(
            lambda: only_delivery().status == DeliveryStatus.DELIVERED, timeout=60, message=second.output()[-2000:]
        )

    assert len(receiver.requests) == 2 and only_delivery().attempt_count == 2
    assert all(verify_signature(endpoint["secret"], r.headers["Kana-Signature"], r.body) for r in receiver.requests)


def test_a_notification_costs_the_sender_a_fixed_number_of_queries(
    api, tenant, django_assert_num_queries, django_capture_on_commit_callbacks
):
    """In the sender's transaction: one query when nobody listens; with listeners, the same
    few queries however many endpoints (events and deliveries are inserted set-wise)."""

    def send(key, queries):
        with django_capture_on_commit_callbacks(execute=False), transaction.atomic():
            with django_assert_num_queries(queries):
                notification.send(
                    None, workspace_id=tenant.workspace.pk, event_type="usage.limit_reached", data={}, event_key=key
                )

    create_endpoint(api, "https://hooks.example.com/merges", ["user.merged"])
    send("nobody-listens", 1)
    create_endpoint(api, "https://hooks.example.com/one")
    send("one-endpoint", 3)  # endpoints, the event (ON CONFLICT DO NOTHING), the deliveries
    for n in range(5):
        create_endpoint(api, f"https://hooks.example.com/{n}")
    send("six-endpoints", 3)
    send("six-endpoints", 2)  # a key notified before stops at the event's insert
    assert WebhookDelivery.objects.count() == 7


def test_thresholds_for_lists_what_active_threshold_endpoints_want(api, tenant):
    from webhooks.selectors import thresholds_for

    create_endpoint(api, "https://hooks.example.com/a", ["usage.threshold_reached"], thresholds=[0.5, 1])
    create_endpoint(api, "https://hooks.example.com/b", ["usage.threshold_reached"], thresholds=[0.8, 1])
    create_endpoint(api, "https://hooks.example.com/c", ["user.merged"], thresholds=[0.25])
    paused = create_endpoint(api, "https://hooks.example.com/d", ["usage.threshold_reached"], thresholds=[0.1])
    api.patch(f"webhooks/{paused['id']}", {"active": False})

    assert thresholds_for(tenant.workspace.pk) == [0.5, 0.8, 1.0]


def test_a_rotated_secret_signs_with_both_until_the_old_one_expires(api, notify):
    with Receiver() as receiver:
        endpoint = create_endpoint(api, receiver.url, ["usage.limit_reached"])
        rotated = api.post(f"webhooks/{endpoint['id']}/rotate-secret", {"previous_valid_seconds": 3600})
        assert rotated.status_code == 200, rotated.content
        new_secret = rotated.json()["secret"]
        assert new_secret != endpoint["secret"] and "secret" not in api.get(f"webhooks/{endpoint['id']}").json()
        notify("limit:u1:exports:2025-01")

        retired = api.post(f"webhooks/{endpoint['id']}/rotate-secret", {"previous_valid_seconds": 0})
        newest = retired.json()["secret"]
        notify("limit:u1:exports:2025-02")

    overlap, after = receiver.requests
    header = overlap.headers["Kana-Signature"]
    assert header.count("v1=") == 2
    assert verify_signature(new_secret, header, overlap.body) and verify_signature(
        endpoint["secret"], header, overlap.body
    )
    header = after.headers["Kana-Signature"]
    assert header.count("v1=") == 1 and verify_signature(newest, header, after.body)
    assert not verify_signature(new_secret, header, after.body)
    entries = AuditEntry.objects.filter(action="webhook.update").order_by("pk")
    assert [e.after["previous_valid_seconds"] for e in entries] == [3600, 0]
    assert not any(endpoint["secret"] in str(e.before) + str(e.after) for e in entries)


def test_a_rotation_with_a_bad_overlap_is_refused_and_changes_nothing(api):
    endpoint = create_endpoint(api, "http://127.0.0.1:9/hooks", ["usage.limit_reached"])
    for body in ({"previous_valid_seconds": -1}, {"previous_valid_seconds": 8 * 86400}, {"secret": "mine"}):
        response = api.post(f"webhooks/{endpoint['id']}/rotate-secret", body)
        assert response.status_code == 400, (body, response.content)
    assert api.post("webhooks/999999/rotate-secret", {}).status_code == 404
    assert WebhookEndpoint.objects.get().secret == endpoint["secret"]
