"""The users layer's public services: what the layers above (features, the edges) call.

The work is done by modules named for their concern: ``identity`` (the one engine of the
identify rules, for messages and CSV batches, plus alias and userId resolution), ``merges``
(the merge step and admin merges), ``groups`` and ``bulk`` (set-based SQL for the engine).
"""

from django.db import transaction

from kana import audit
from kana.models import Workspace
from kana.retries import run_with_retries

from .errors import IdentityError
from .groups import GroupCall, record_groups
from .identity import (
    AliasCall,
    IdentifyOutcome,
    IdentifyResult,
    ProfileRow,
    RowOutcome,
    TouchedUsers,
    alias_user,
    alias_users,
    apply_profile_row,
    apply_profile_rows,
    identify_user,
    identify_users,
    known_users_sql,
    resolve_users,
    update_user,
    upsert_user_by_email,
)
from .merges import MergeResult, current_user_pk, merge_users
from .models import EndUser
from .signals import user_deleting
from .unmerge import UndoResult, merge_undo

__all__ = [
    "AliasCall",
    "GroupCall",
    "IdentifyOutcome",
    "IdentifyResult",
    "IdentityError",
    "MergeResult",
    "ProfileRow",
    "RowOutcome",
    "TouchedUsers",
    "UndoResult",
    "alias_user",
    "alias_users",
    "apply_profile_row",
    "apply_profile_rows",
    "current_user_pk",
    "delete_user",
    "identify_user",
    "identify_users",
    "known_users_sql",
    "merge_undo",
    "merge_users",
    "record_groups",
    "resolve_users",
    "update_user",
    "upsert_user_by_email",
]


def delete_user(*, workspace: Workspace, user_pk: int, actor: str = "") -> None:
    """Delete a user with its identities and usage; its events stay, detached, for the record.

    Safe while events for the user arrive: the user's row is locked first. Ingest checks its
    events' and usage's foreign key at commit with a KEY SHARE lock on this row, so every
    insert either committed before the lock (and is detached below) or waits for this delete
    and then fails its check, and ingest's retry resolves the userId to a new user. Detaching
    first and locking later (the plain delete) let an event commit in between, and the delete
    failed at COMMIT on the events' foreign key.
    """

    @transaction.atomic
    def once() -> None:
        users = EndUser.objects.for_workspace(workspace).filter(pk=user_pk)
        before = users.select_for_update().values("user_id", "name", "email", "billing_id").first()
        if before is None:
            raise IdentityError("unknown_user", f"no user with id {user_pk}", "id")
        user_deleting.send(EndUser, workspace_id=workspace.pk, user_pk=user_pk)
        users.delete()
        audit.record(workspace, actor, "user.delete", user_pk, before=before)

    run_with_retries(once)
