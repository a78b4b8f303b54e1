"""Reads of webhook endpoints and deliveries, always within one workspace."""

import json

from django.db.models import Prefetch, QuerySet

from kana.models import Workspace

from .models import DeliveryAttempt, WebhookDelivery, WebhookEndpoint, WebhookEventType


def active_endpoint_events_sql(workspace_id: int) -> tuple[str, list]:
    """The event types of the workspace's active endpoints, as a statement to send in another
    layer's message (positional parameters); ``endpoint_events`` reads its rows."""
    return (
        f"SELECT events FROM {WebhookEndpoint._meta.db_table} WHERE workspace_id = %s AND active = %s",
        [workspace_id, True],
    )


def endpoint_events(rows: list[tuple]) -> list[list[str]]:
    """Each endpoint's event types from ``active_endpoint_events_sql``'s rows (SQLite's
    driver gives the JSON column as text, psycopg decodes it)."""
    return [json.loads(events) if isinstance(events, str) else events for (events,) in rows]


def thresholds_for(workspace_id: int) -> list[float]:
    """Every threshold that an active endpoint of the workspace listening to
    ``usage.threshold_reached`` wants, sorted: the crossings worth notifying."""
    wanted = set()
    for events, thresholds in (
        WebhookEndpoint.objects.for_workspace(workspace_id).filter(active=True).values_list("events", "thresholds")
    ):
        if WebhookEventType.USAGE_THRESHOLD_REACHED in events:
            wanted.update(thresholds)
    return sorted(wanted)


def delivery_list(workspace: Workspace, *, endpoint: WebhookEndpoint) -> QuerySet:
    """An endpoint's deliveries, newest first, each with its event and its attempts (oldest
    first) loaded in one query per page."""
    attempts = DeliveryAttempt.objects.for_workspace(workspace).order_by("number")
    return (
        WebhookDelivery.objects.for_workspace(workspace)
        .filter(endpoint=endpoint)
        .select_related("event")
        .prefetch_related(Prefetch("attempt_log", queryset=attempts))
        .order_by("-created_at", "-pk")
    )
