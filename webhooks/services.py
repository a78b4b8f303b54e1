"""Webhook endpoints (create, change, delete) and notifications turned into deliveries.

``event_record`` is what the receivers call (``receivers.py``): inside the sender's
transaction it stores the event once per ``event_key`` and one pending delivery per active
endpoint that listens, and sends their tasks only when that transaction commits. A
rolled-back change therefore notifies nobody, and the same notification sent twice is
delivered once.
"""

import math
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.utils import timezone

from kana import audit, jobs
from kana.errors import DomainError
from kana.models import Workspace

from . import addresses
from .models import WebhookDelivery, WebhookEndpoint, WebhookEvent, WebhookEventType

# The Celery task that sends one delivery (webhooks/tasks.py), by name.
SEND_DELIVERY_TASK = "webhooks.tasks.send_delivery"

MAX_URL_LENGTH = 2000
MAX_THRESHOLDS = 10
# Thresholds are compared after rounding, so 0.8 sent as 0.8000000001 still matches.
THRESHOLD_DECIMALS = 6
DEFAULT_THRESHOLDS = (0.8, 1.0)


class WebhookError(DomainError):
    """A webhook endpoint change the services refuse."""


def _new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def clean_url(url: str) -> str:
    """An absolute http(s) URL with a host; anything else is refused (400 ``invalid_url``)."""
    url = (url or "").strip()
    if not url or len(url) > MAX_URL_LENGTH:
        raise WebhookError("invalid_url", f"url must be an http(s) URL of at most {MAX_URL_LENGTH} characters", "url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number or out of range)
    except ValueError:
        raise WebhookError("invalid_url", "url is not a valid URL", "url") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookError("invalid_url", "url must start with http:// or https://", "url")
    if not parts.hostname:
        raise WebhookError("invalid_url", "url must name a host", "url")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise WebhookError("invalid_url", "url must not contain spaces or control characters", "url")
    if addresses.private_on_its_face(parts.hostname):
        raise WebhookError("invalid_url", "url must name a public host, not a private or local address", "url")
    return url


def clean_events(events: list[str]) -> list[str]:
    """The event types, known, without repeats, in a stable order; at least one."""
    unknown = [e for e in events if e not in WebhookEventType.values]
    if unknown:
        allowed = ", ".join(WebhookEventType.values)
        raise WebhookError("invalid_event_type", f"unknown event type {unknown[0]!r}: one of {allowed}", "events")
    if not events:
        raise WebhookError("invalid_event_type", "events must name at least one event type", "events")
    return [e for e in WebhookEventType.values if e in events]


def clean_thresholds(thresholds: list[float]) -> list[float]:
    """Fractions of a budget, 0 < t <= 1, sorted, without repeats; at most MAX_THRESHOLDS."""
    if len(thresholds) > MAX_THRESHOLDS:
        raise WebhookError("invalid_threshold", f"at most {MAX_THRESHOLDS} thresholds", "thresholds")
    for value in thresholds:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise WebhookError("invalid_threshold", "thresholds are numbers", "thresholds")
        if not 0 < value <= 1:
            raise WebhookError(
                "invalid_threshold", f"a threshold is a fraction of the budget, 0 < t <= 1 (got {value})", "thresholds"
            )
    return sorted({round(float(value), THRESHOLD_DECIMALS) for value in thresholds})


def _summary(endpoint: WebhookEndpoint) -> dict:
    """What the audit log keeps of an endpoint: never its secret."""
    return {
        "url": endpoint.url,
        "events": endpoint.events,
        "thresholds": endpoint.thresholds,
        "active": endpoint.active,
    }


def webhook_create(
    *,
    workspace: Workspace,
    url: str,
    events: list[str],
    thresholds: list[float] | None = None,
    active: bool = True,
    actor: str = "",
) -> WebhookEndpoint:
    """Create an endpoint with a new random secret (on the returned object: the caller shows
    it once). ``thresholds`` default to 0.8 and 1.0."""
    endpoint = WebhookEndpoint(
        workspace=workspace,
        url=clean_url(url),
        events=clean_events(events),
        thresholds=clean_thresholds(list(DEFAULT_THRESHOLDS) if thresholds is None else thresholds),
        active=active,
        secret=_new_secret(),
    )
    with transaction.atomic():
        endpoint.save()
        audit.record(workspace, actor, "webhook.create", endpoint.pk, after=_summary(endpoint))
    return endpoint


def webhook_update(
    *,
    workspace: Workspace,
    endpoint: WebhookEndpoint,
    url: str | None = None,
    events: list[str] | None = None,
    thresholds: list[float] | None = None,
    active: bool | None = None,
    actor: str = "",
) -> WebhookEndpoint:
    """Change an endpoint's URL, events, thresholds or active flag (``None``: unchanged).
    Deliveries already made keep going to the endpoint as it is when they are attempted."""
    changes = {}
    if url is not None:
        changes["url"] = clean_url(url)
    if events is not None:
        changes["events"] = clean_events(events)
    if thresholds is not None:
        changes["thresholds"] = clean_thresholds(thresholds)
    if active is not None:
        changes["active"] = active
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.for_workspace(workspace).select_for_update().get(pk=endpoint.pk)
        before = _summary(endpoint)
        for name, value in changes.items():
            setattr(endpoint, name, value)
        endpoint.save()
        audit.record(workspace, actor, "webhook.update", endpoint.pk, before=before, after=_summary(endpoint))
    return endpoint


# How long a rotated-out secret still signs deliveries by default: a day, time enough for the
# receiver to switch; at most a week (a leaked secret should not linger).
DEFAULT_PREVIOUS_SECRET_SECONDS = 24 * 3600
MAX_PREVIOUS_SECRET_SECONDS = 7 * 24 * 3600


def webhook_rotate_secret(
    *,
    workspace: Workspace,
    endpoint: WebhookEndpoint,
    previous_valid_seconds: int = DEFAULT_PREVIOUS_SECRET_SECONDS,
    actor: str = "",
) -> WebhookEndpoint:
    """Give the endpoint a new secret (on the returned object: the caller shows it once).
    The old one keeps signing too, as a second ``v1=``, for ``previous_valid_seconds``
    (0: it stops at once, for a leaked secret). Audited as ``webhook.update`` (never a secret)."""
    if not 0 <= previous_valid_seconds <= MAX_PREVIOUS_SECRET_SECONDS:
        raise WebhookError(
            "invalid_value",
            f"previous_valid_seconds is from 0 to {MAX_PREVIOUS_SECRET_SECONDS}",
            "previous_valid_seconds",
        )
    now = timezone.now()
    with transaction.atomic():
        endpoint = WebhookEndpoint.objects.for_workspace(workspace).select_for_update().get(pk=endpoint.pk)
        keep = previous_valid_seconds > 0
        endpoint.previous_secret = endpoint.secret if keep else ""
        endpoint.previous_secret_expires_at = now + timedelta(seconds=previous_valid_seconds) if keep else None
        endpoint.secret = _new_secret()
        endpoint.save()
        audit.record(
            workspace,
            actor,
            "webhook.update",
            endpoint.pk,
            before=_summary(endpoint),
            after={**_summary(endpoint), "secret": "rotated", "previous_valid_seconds": previous_valid_seconds},
        )
    return endpoint


def webhook_delete(*, workspace: Workspace, endpoint: WebhookEndpoint, actor: str = "") -> None:
    """Delete an endpoint with its deliveries (pending ones are not sent)."""
    with transaction.atomic():
        WebhookEndpoint.objects.for_workspace(workspace).filter(pk=endpoint.pk).delete()
        audit.record(workspace, actor, "webhook.delete", endpoint.pk, before=_summary(endpoint))


# --- Notifications -----------------------------------------------------------------------


def _threshold_of(data: dict) -> float:
    """The fraction a threshold notification crossed: a number (a Decimal, or its text, too)."""
    value = data.get("threshold")
    try:
        if isinstance(value, bool):
            raise TypeError
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"a usage.threshold_reached notification carries data['threshold'], got {value!r}") from None
    return round(threshold, THRESHOLD_DECIMALS)


def _listens(endpoint: WebhookEndpoint, event_type: str, data: dict) -> bool:
    if event_type not in endpoint.events:
        return False
    if event_type == WebhookEventType.USAGE_THRESHOLD_REACHED:
        crossed = _threshold_of(data)
        return any(round(float(t), THRESHOLD_DECIMALS) == crossed for t in endpoint.thresholds)
    return True


_INSERT_EVENT = (
    f"INSERT INTO {WebhookEvent._meta.db_table} (workspace_id, event_type, event_key, data, created_at)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (workspace_id, event_key) DO NOTHING RETURNING id"
)


def _insert_event(*, workspace_id: int, event_type: str, event_key: str, data: dict, now) -> int | None:
    """The new event's id, or None when the workspace has an event with this key already.

    ``ON CONFLICT DO NOTHING`` rather than a check first: two transactions notifying the same
    key at once are decided by the unique index (the second waits for the first to commit
    and then inserts nothing), not by a read that both pass.
    """
    params = [
        workspace_id,
        event_type,
        event_key,
        connection.ops.adapt_json_value(data, DjangoJSONEncoder),
        connection.ops.adapt_datetimefield_value(now),
    ]
    with connection.cursor() as cursor:
        cursor.execute(_INSERT_EVENT, params)
        row = cursor.fetchone()
    return row[0] if row else None


def event_record(*, workspace_id: int, event_type: str, data: dict, event_key: str) -> WebhookEvent | None:
    """Store a notification and one pending delivery per active endpoint that listens; their
    tasks are sent once the caller's transaction commits.

    Returns the new event, or None when nothing was stored: no active endpoint listens (an
    event nobody listens to is not kept), or the key was notified before. A
    ``usage.threshold_reached`` notification carries ``data["threshold"]`` (the fraction of
    the budget crossed) and reaches only the endpoints whose thresholds include it.
    """
    if event_type not in WebhookEventType.values:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    if event_type == WebhookEventType.USAGE_THRESHOLD_REACHED:
        _threshold_of(data)  # a notification without one is the sender's bug: fail its tests
    if not event_key or len(event_key) > 255:
        raise ValueError("a notification's event_key is 1-255 characters")
    active = WebhookEndpoint.objects.for_workspace(workspace_id).filter(active=True).only("pk", "events", "thresholds")
    endpoints = [endpoint for endpoint in active if _listens(endpoint, event_type, data)]
    if not endpoints:
        return None
    now = timezone.now()
    # No savepoint: inside the sender's transaction this commits or rolls back with it (two
    # round trips fewer per notification); on its own it is a transaction.
    with transaction.atomic(savepoint=False):
        event_id = _insert_event(
            workspace_id=workspace_id, event_type=event_type, event_key=event_key, data=data, now=now
        )
        if event_id is None:
            return None
        deliveries = WebhookDelivery.objects.bulk_create(
            WebhookDelivery(
                workspace_id=workspace_id, event_id=event_id, endpoint=endpoint, next_attempt_at=now, created_at=now
            )
            for endpoint in endpoints
        )
        for delivery in deliveries:
            jobs.enqueue_on_commit(SEND_DELIVERY_TASK, delivery.pk)
    return WebhookEvent(
        pk=event_id, workspace_id=workspace_id, event_type=event_type, event_key=event_key, data=data, created_at=now
    )
