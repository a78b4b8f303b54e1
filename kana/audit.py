"""The audit log: every admin action, written in the action's own transaction.

``record`` refuses to run outside a transaction: an entry written on its own could outlive an
action that then rolled back (or be lost while the action committed). Callers pass small
JSON-able summaries, not whole rows.
"""

from typing import Any

from django.db import transaction
from django.db.models import QuerySet

from .models import AuditEntry, Workspace

ACTIONS = (
    "feature.create",
    "feature.update",
    "feature.delete",
    "rule.create",
    "rule.update",
    "rule.delete",
    "user.update",
    "user.delete",
    "merge",
    "merge.undo",
    "csv.apply",
    "key.create",
    "key.revoke",
    "event.void",
    "package.create",
    "package.update",
    "package.delete",
    "subscription.create",
    "subscription.update",
    "workspace.update",
    "webhook.create",
    "webhook.update",
    "webhook.delete",
    "suppression.delete",
)


# What an action's object is, by the action's first word (``object_type`` overrides it).
OBJECT_TYPES = {
    "feature": "feature",
    "rule": "rule",
    "user": "user",
    "merge": "user",
    "csv": "import_job",
    "key": "api_key",
    "event": "event",
    "package": "package",
    "subscription": "subscription",
    "workspace": "workspace",
    "webhook": "webhook_endpoint",
    "suppression": "suppression",
}


def record(
    workspace: Workspace | int,
    actor: str,
    action: str,
    object_id: Any,
    *,
    before: dict | None = None,
    after: dict | None = None,
    object_type: str | None = None,
) -> AuditEntry:
    """Write one audit entry: ``record(workspace, actor, "feature.create", feature.key, after=...)``.
    Must be called inside the action's transaction."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("kana.audit.record must run inside the transaction of the action it records")
    workspace_id = workspace if isinstance(workspace, int) else workspace.pk
    return AuditEntry.objects.create(
        workspace_id=workspace_id,
        actor=(actor or "")[:255],
        action=action,
        object_type=object_type or OBJECT_TYPES[action.split(".")[0]],
        object_id=str(object_id)[:255],
        before=before,
        after=after,
    )


def audit_entries(
    workspace: Workspace,
    *,
    entries: QuerySet | None = None,
    action: str | None = None,
    object_type: str | None = None,
) -> QuerySet:
    """A workspace's entries (of ``entries``, when given), newest first (id breaks ties)."""
    entries = (AuditEntry.objects.all() if entries is None else entries).filter(workspace_id=workspace.pk)
    if action:
        entries = entries.filter(action=action)
    if object_type:
        entries = entries.filter(object_type=object_type)
    return entries.order_by("-created_at", "-pk")
