"""Corrections of stored events (SPEC §12): voiding an event an admin says was wrong.

A void keeps the event (for the record) with status ``voided``, the reason and the time,
and removes its usage through the ledger, so usage totals drop at once. It is idempotent: a
second void finds the event voided and changes nothing. identify/alias/group events are
refused: their effect on users (profile values, merges, memberships) is not undone by a void.
"""

from django.db import transaction
from django.utils import timezone

from kana import audit
from kana.errors import DomainError
from kana.models import Workspace

from . import ledger
from .models import USAGE_TYPES, Event, EventStatus

MAX_REASON_LENGTH = 500


class CorrectionError(DomainError):
    """A correction the services refuse."""


def event_void(*, workspace: Workspace, event_id: int, reason: str, actor: str = "") -> Event:
    """Void one track/page/screen event of the workspace; returns it as it is afterwards."""
    reason = (reason or "").strip()
    if not reason:
        raise CorrectionError("invalid_reason", "say why the event is voided", "reason")
    if len(reason) > MAX_REASON_LENGTH:
        raise CorrectionError("invalid_reason", f"a reason is at most {MAX_REASON_LENGTH} characters", "reason")
    with transaction.atomic():
        event = Event.objects.for_workspace(workspace).select_for_update().filter(pk=event_id).first()
        if event is None:
            raise CorrectionError("not_found", f"no event with id {event_id}", "id", status=404)
        if event.status == EventStatus.VOIDED:
            return event  # voided already: the first void's reason and time stand
        if event.type not in USAGE_TYPES:
            raise CorrectionError(
                "not_voidable",
                f"a {event.type} event changed users, which a void would not undo; only track, page "
                "and screen events can be voided",
                "id",
                status=409,
            )
        before = {"status": event.status, "unmapped_reason": event.unmapped_reason}
        removed = ledger.void_event(event=event, reason=reason, voided_at=timezone.now())
        after = {"status": event.status, "reason": reason}
        audit.record(workspace, actor, "event.void", event.pk, before={**before, "usage": removed}, after=after)
    return event
