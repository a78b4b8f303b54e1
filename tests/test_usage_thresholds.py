"""Threshold notifications: once per subject, feature, period and threshold, whichever path crossed it."""

from contextlib import contextmanager
from datetime import UTC, datetime

from entitlements.models import ThresholdCrossing
from entitlements.thresholds import notify_usage_thresholds
from features.models import UsageTouch
from kana.signals import notification

from .api_support import ApiClient, feature, identify, rule, track
from .entitlement_support import consume, join_group, package, subscribe, user_with_package


@contextmanager
def notifications():
    sent = []

    def receiver(sender, **kwargs):
        sent.append(kwargs)

    notification.connect(receiver, weak=False)
    try:
        yield sent
    finally:
        notification.disconnect(receiver)


def now() -> str:
    return datetime.now(UTC).isoformat()


def kinds(sent) -> list[tuple[str, float]]:
    return [(n["event_type"], n["data"]["threshold"]) for n in sent if n["event_type"].startswith("usage.")]


def test_ingest_crossing_80_then_100_percent_notifies_each_once(tenant):
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    with notifications() as sent:
        track(tenant, "u1", "Sent", featureId="messages", delta=7, _at=now())
        notify_usage_thresholds()
        assert sent == []
        track(tenant, "u1", "Sent", featureId="messages", delta=1, _at=now())
        notify_usage_thresholds()
        assert kinds(sent) == [("usage.threshold_reached", 0.8)]
        track(tenant, "u1", "Sent", featureId="messages", delta=5, _at=now())
        track(tenant, "u1", "Sent", featureId="messages", delta=5, _at=now())
        notify_usage_thresholds()
        notify_usage_thresholds()
    assert kinds(sent) == [
        ("usage.threshold_reached", 0.8),
        ("usage.threshold_reached", 1.0),
        ("usage.limit_reached", 1.0),
    ]
    assert sent[1]["data"]["user_id"] == "u1" and sent[1]["data"]["consumption"]["used"] == 18
    assert len({n["event_key"] for n in sent}) == 3
    assert ThresholdCrossing.objects.count() == 2
    assert not UsageTouch.objects.exists()


def test_reprocessing_a_merge_and_a_consume_cross_thresholds_too(tenant, tasks_in_process):
    from features.models import ReprocessingJob
    from features.tasks import run_reprocessing_job

    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    track(tenant, "u1", "Sent", n=8, _at=now())  # unmapped: no rule yet
    identify(tenant, "u2")
    track(tenant, "u2", "Other", featureId="messages", delta=2, _at=now())
    user_with_package(tenant, "u3", 5)
    with notifications() as sent:
        rule(tenant, "messages", "Sent", amount_property="n")
        for job in ReprocessingJob.objects.filter(status="queued"):
            run_reprocessing_job(job_id=job.pk)
        notify_usage_thresholds()
        assert kinds(sent) == [("usage.threshold_reached", 0.8)]  # reprocessing

        response = ApiClient(tenant).post("users/merge", {"user_ids": [_pk(tenant, "u1"), _pk(tenant, "u2")]})
        assert response.status_code == 200, response.content
        notify_usage_thresholds()
        assert kinds(sent)[1:] == [("usage.threshold_reached", 1.0), ("usage.limit_reached", 1.0)]  # merge

        consume(tenant, "u3", "messages", "c1", delta=4)
        notify_usage_thresholds()
    assert kinds(sent)[3:] == [("usage.threshold_reached", 0.8)]  # consume
    assert sent[3]["data"]["user_id"] == "u3"


def _pk(tenant, user_id):
    from users.selectors import user_pk_for

    return user_pk_for(tenant.workspace, user_id)


def test_a_groups_budget_is_notified_for_the_group(tenant):
    feature(tenant, "messages")
    for user_id in ("a", "b"):
        identify(tenant, user_id)
        join_group(tenant, user_id, "acme")
    package(tenant, "team", {"feature": "messages", "limit": 5})
    subscribe(tenant, "team", group_id="acme")
    with notifications() as sent:
        track(tenant, "a", "Sent", featureId="messages", delta=2, _at=now())
        track(tenant, "b", "Sent", featureId="messages", delta=2, _at=now())
        notify_usage_thresholds()
    assert [(n["data"]["group_id"], n["data"]["threshold"]) for n in sent] == [("acme", 0.8)]


def test_a_late_event_crosses_the_threshold_of_its_own_period(tenant):
    from datetime import timedelta

    feature(tenant, "messages")
    identify(tenant, "u1")
    package(tenant, "daily", {"feature": "messages", "limit": 5, "reset_period": "day"})
    started = datetime.now(UTC) - timedelta(days=3, hours=1)
    subscribe(tenant, "daily", user_id="u1", started_at=started.isoformat())
    with notifications() as sent:
        late = (started + timedelta(days=1, hours=2)).isoformat()
        track(tenant, "u1", "Sent", featureId="messages", delta=5, _at=late)
        notify_usage_thresholds()
    assert kinds(sent) == [
        ("usage.threshold_reached", 0.8),
        ("usage.threshold_reached", 1.0),
        ("usage.limit_reached", 1.0),
    ]
    assert {n["data"]["period"]["start"] for n in sent} == {(started + timedelta(days=1)).isoformat()}


def test_an_endpoints_own_threshold_is_crossed_and_delivered(tenant, settings):
    """An endpoint asking for 50 % (or 12.3456 %) hears of it, not only of the defaults."""
    from webhooks.models import WebhookEvent

    from .webhook_support import create_endpoint

    settings.KANA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True
    api = ApiClient(tenant)
    create_endpoint(api, "http://127.0.0.1:9/half", ["usage.threshold_reached"], thresholds=[0.5, 0.123456])
    feature(tenant, "messages")
    user_with_package(tenant, "u1", 10)
    with notifications() as sent:
        track(tenant, "u1", "Sent", featureId="messages", delta=1, _at=now())
        notify_usage_thresholds()
        assert kinds(sent) == []
        track(tenant, "u1", "Sent", featureId="messages", delta=5, _at=now())
        notify_usage_thresholds()
    assert kinds(sent) == [("usage.threshold_reached", 0.123456), ("usage.threshold_reached", 0.5)]
    stored = WebhookEvent.objects.filter(event_type="usage.threshold_reached").values_list("data__threshold", flat=True)
    assert sorted(stored) == [0.123456, 0.5]
