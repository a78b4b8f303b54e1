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
    MessageIdentify,
    ProfileRow,
    RowOutcome,
    TouchedUsers,
    alias_user,
    alias_users,
    apply_profile_row,
    apply_profile_rows,
    identify_user,
    identify_users,
    resolve_users,
    suppressed_user_ids,
    update_user,
    upsert_user_by_email,
)
from .merges import MergeResult, current_user_pk, merge_users
from .models import AnonymousLink, EndUser, Suppression, UserIdentity
from .signals import user_deleting
from .unmerge import UndoResult, merge_undo

__all__ = [
    "AliasCall",
    "GroupCall",
    "IdentifyOutcome",
    "IdentifyResult",
    "IdentityError",
    "MergeResult",
    "MessageIdentify",
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
    "lift_suppression",
    "link_anonymous_ids",
    "merge_undo",
    "merge_users",
    "record_groups",
    "resolve_users",
    "suppressed_user_ids",
    "update_user",
    "upsert_user_by_email",
]


# What happens to a deleted user's events: kept (detached, anonymised) or deleted.
DELETE_EVENTS_CHOICES = ("keep", "delete")


def delete_user(
    *, workspace: Workspace, user_pk: int, actor: str = "", events: str = "keep", suppress: bool = True
) -> None:
    """Delete a user and its identities, and suppress its userIds; ``events`` says what becomes
    of its events and usage: ``keep`` (they stay, detached from any user and anonymised, so
    feature totals do not change) or ``delete`` (they go, and the totals with them).

    Every userId that resolved to the user is suppressed in the same transaction (unless
    ``suppress`` is False: a profile deleted to be rebuilt by the next identify): later
    messages naming one are answered ``suppressed`` and not stored. The audit entry names the
    choices.

    Safe while events for the user arrive: the user's row is locked first. Ingest checks its
    events' and usage's foreign key at commit with a KEY SHARE lock on this row, so every
    insert either committed before the lock (and is detached or deleted below) or waits for
    this delete and then fails its check; ingest's retry then finds the userId suppressed.
    """
    if events not in DELETE_EVENTS_CHOICES:
        raise IdentityError("invalid_value", "events must be keep or delete", "events")

    @transaction.atomic
    def once() -> None:
        users = EndUser.objects.for_workspace(workspace).filter(pk=user_pk)
        before = users.select_for_update().values("user_id", "name", "email", "billing_id").first()
        if before is None:
            raise IdentityError("unknown_user", f"no user with id {user_pk}", "id")
        user_ids = sorted(
            UserIdentity.objects.for_workspace(workspace).filter(user_id=user_pk).values_list("external_id", flat=True)
        )
        user_deleting.send(EndUser, workspace_id=workspace.pk, user_pk=user_pk, keep_events=events == "keep")
        users.delete()
        if suppress:
            Suppression.objects.bulk_create(
                [Suppression(workspace=workspace, user_id=user_id) for user_id in user_ids], ignore_conflicts=True
            )
        AnonymousLink.objects.for_workspace(workspace).filter(user_id__in=user_ids).delete()
        audit.record(
            workspace,
            actor,
            "user.delete",
            user_pk,
            before={**before, "user_ids": user_ids},
            after={"events": events, "suppress": suppress},
        )

    run_with_retries(once)


@transaction.atomic
def lift_suppression(*, workspace: Workspace, suppression_pk: int, actor: str = "") -> None:
    """Stop suppressing a deleted user's userId: later messages naming it are stored again
    (an identify creates a new user). Audited (``suppression.delete``) in the same transaction."""
    row = (
        Suppression.objects.for_workspace(workspace)
        .select_for_update()
        .filter(pk=suppression_pk)
        .values("user_id", "created_at")
        .first()
    )
    if row is None:
        raise IdentityError("not_found", f"no suppression with id {suppression_pk}", "id", status=404)
    Suppression.objects.filter(pk=suppression_pk).delete()
    audit.record(
        workspace,
        actor,
        "suppression.delete",
        suppression_pk,
        before={"user_id": row["user_id"], "created_at": row["created_at"].isoformat()},
    )


def link_anonymous_ids(*, workspace: Workspace, links: dict[str, str]) -> None:
    """Remember anonymousId -> userId links (one statement); an anonymousId linked before
    keeps its first link."""
    AnonymousLink.objects.bulk_create(
        [AnonymousLink(workspace=workspace, anonymous_id=a, user_id=u) for a, u in sorted(links.items())],
        ignore_conflicts=True,
    )
