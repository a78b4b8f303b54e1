"""What turns notifications into webhook events (connected in ``WebhooksConfig.ready``).

Both receivers run inside the sender's transaction (``kana.signals.notification`` is sent
where the change is made; a merge sends ``user_absorbed`` inside its own), so the event and
its deliveries commit or roll back with the change that caused them.
"""

from django.dispatch import receiver

from kana.db import pipelined
from kana.signals import notification, thresholds_wanted
from users.models import MergeRecord
from users.signals import user_absorbed

from .models import WebhookEventType
from .selectors import active_endpoint_events_sql, endpoint_events, thresholds_for
from .services import event_record


@receiver(notification, dispatch_uid="webhooks.notification")
def _on_notification(sender, *, workspace_id: int, event_type: str, data: dict, event_key: str, **_kwargs) -> None:
    event_record(workspace_id=workspace_id, event_type=event_type, data=data, event_key=event_key)


@receiver(thresholds_wanted, dispatch_uid="webhooks.thresholds_wanted")
def _on_thresholds_wanted(sender, *, workspace_id: int, **_kwargs) -> list[float]:
    return thresholds_for(workspace_id)


@receiver(user_absorbed, dispatch_uid="webhooks.user_merged")
def _on_user_absorbed(
    sender, *, workspace_id: int, absorbed_pk: int, survivor_pk: int, **_kwargs
) -> list[pipelined.Step]:
    """``user.merged`` with both Kana ids. Keyed by the merge's ledger row (written before the
    signal): a replayed merge writes no row and sends no signal, while the same user merged
    again after an undo is a new merge and a new event.

    The endpoints' read travels in the merge's message (``users.signals.user_absorbed``);
    the common case, nobody listening, ends there, with no ledger read."""

    def then(rows: list[tuple]) -> None:
        if not any(WebhookEventType.USER_MERGED in events for events in endpoint_events(rows)):
            return
        merge_id, reason, user_ids = (
            MergeRecord.objects.for_workspace(workspace_id)
            .filter(absorbed_id=absorbed_pk, undone_at__isnull=True)
            .values_list("pk", "reason", "absorbed_snapshot__user_ids")
            .get()
        )
        data = {
            "merge_id": merge_id,
            "survivor_id": survivor_pk,
            "absorbed_id": absorbed_pk,
            "absorbed_user_ids": user_ids or [],
            "reason": reason,
        }
        event_record(
            workspace_id=workspace_id,
            event_type=WebhookEventType.USER_MERGED,
            data=data,
            event_key=f"user.merged:{merge_id}",
        )

    sql, params = active_endpoint_events_sql(workspace_id)
    return [pipelined.Step(sql, params, then)]
