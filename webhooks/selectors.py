"""Reads of webhook endpoints and deliveries, always within one workspace."""

from django.db.models import Prefetch, QuerySet

from kana.models import Workspace

from .models import DeliveryAttempt, WebhookDelivery, WebhookEndpoint, WebhookEventType


def listens_to(workspace_id: int, event_type: str) -> bool:
    """Whether an active endpoint of the workspace takes ``event_type`` (thresholds aside)."""
    return any(
        event_type in events
        for events in WebhookEndpoint.objects.for_workspace(workspace_id)
        .filter(active=True)
        .values_list("events", flat=True)
    )


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
