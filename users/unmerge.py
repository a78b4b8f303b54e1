"""Undoing a merge (SPEC §12, "Unmerge"): the absorbed user comes back as it was.

From its ledger row (``MergeRecord``) the absorbed user is re-created with the same Kana id,
its profile from the snapshot (values and their ``*_set_at`` stamps), the userIds it had
that still resolve to the survivor, and its group memberships; then the ``user_restored``
signal has ``features`` move back every event addressed to one of those userIds (before or
after the merge) with its usage. The survivor keeps the rest; see docs/identity.md
("Unmerge") for what is recomputed on it.

Only the newest of dependent merges can be undone: a later merge that absorbed the survivor,
or that carried the restored user's userIds along, must be undone first (409
``merge_not_undoable`` naming it). Undoing an undone merge changes nothing.

Locks: first the workspace's rules lock, exclusively, as a rule creation takes it. Usage
ingest (track/page/screen) takes it shared before it resolves userIds and holds it to commit,
so the undo waits for in-flight usage transactions (their events are then visible and move
back) and usage that starts later resolves the userIds after the undo commits. A merge needs
no such fence, because it deletes the absorbed user (a stale resolution fails its foreign key
and is retried); an undo leaves both users in place. Then, as a merge: the identity advisory
locks of every userId and email involved (sorted), the survivor's row, the ledger row. A
concurrent identify or alias of one of the userIds waits for the undo and then resolves to the
restored user.
"""

from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from kana import audit
from kana.locks import lock_keys, lock_rules_exclusive
from kana.models import Workspace
from kana.retries import ConcurrentChange, run_with_retries

from .errors import IdentityError
from .identity import identity_lock_keys
from .merges import follow_merges
from .models import EndUser, Group, GroupMembership, MergeRecord, UserIdentity
from .profile import restore_profile, revert_taken_fields
from .signals import user_restored


@dataclass
class UndoResult:
    record: MergeRecord
    restored: EndUser | None
    survivor: EndUser | None
    # True when the merge had been undone before: nothing changed.
    already_undone: bool = False


def _not_undoable(message: str) -> IdentityError:
    return IdentityError("merge_not_undoable", message, status=409)


def blocking_merge(workspace: Workspace, record: MergeRecord) -> MergeRecord | None:
    """The newest standing merge that depends on ``record``, or None.

    A later merge depends on it when it absorbed the user ``record`` merged into, or when the
    user it absorbed held one of the userIds ``record`` would restore. Both leave the later
    row with the same (current) survivor, since a merge hands its absorbed user's ledger rows
    to its survivor: only those rows are read.
    """
    own_ids = set(record.absorbed_snapshot.get("user_ids") or [])
    later = (
        MergeRecord.objects.for_workspace(workspace)
        .filter(survivor_key=record.survivor_key, undone_at__isnull=True, pk__gt=record.pk)
        .order_by("-pk")
    )
    for other in later:
        if other.absorbed_id == record.merged_into or own_ids & set(other.absorbed_snapshot.get("user_ids") or []):
            return other
    return None


def _holder(workspace: Workspace, record: MergeRecord, restored_pk: int, restored_ids: list[str]) -> int | None:
    """Where an earlier ledger row's survivor is now that ``restored`` is back (None: unchanged).

    Rows written since ``merged_into`` exists follow the ledger from their first survivor;
    older rows move when they carried one of the restored user's userIds.
    """
    if record.merged_into is None:
        ids = set(record.absorbed_snapshot.get("user_ids") or [])
        return restored_pk if ids & set(restored_ids) else None
    return follow_merges(workspace, record.merged_into, via="merged_into", found={restored_pk})


def merge_undo(*, workspace: Workspace, merge_id: int, actor: str = "") -> UndoResult:
    """Undo merge ``merge_id``: restore the absorbed user (see the module docstring)."""

    @transaction.atomic
    def once() -> UndoResult:
        record = MergeRecord.objects.for_workspace(workspace).filter(pk=merge_id).first()
        if record is None:
            raise IdentityError("unknown_merge", f"no merge with id {merge_id} in this workspace", "id", status=404)
        if record.undone_at is not None:
            return _undone(workspace, record)
        snap = record.absorbed_snapshot
        user_ids = list(snap.get("user_ids") or [])
        survivor = EndUser.objects.for_workspace(workspace).filter(pk=record.survivor_key).first()
        keys = identity_lock_keys(
            workspace,
            [*user_ids, *([survivor.user_id] if survivor and survivor.user_id else [])],
            (snap.get("email") or "").strip().lower(),
        )
        if survivor is not None and survivor.email_key:
            keys += identity_lock_keys(workspace, email_key=survivor.email_key)
        lock_rules_exclusive(workspace.pk)
        lock_keys(keys)
        survivor = EndUser.objects.for_workspace(workspace).filter(pk=record.survivor_key).select_for_update().first()
        record = MergeRecord.objects.select_for_update().get(pk=record.pk)
        if record.undone_at is not None:
            return _undone(workspace, record)
        if survivor is None or survivor.pk != record.survivor_key:
            if EndUser.objects.for_workspace(workspace).filter(pk=record.survivor_key).exists():
                raise ConcurrentChange()  # the survivor changed between the read and the lock
            raise _not_undoable(f"merge {record.pk} cannot be undone: its survivor was deleted")
        blocking = blocking_merge(workspace, record)
        if blocking is not None:
            raise _not_undoable(
                f"merge {blocking.pk} depends on merge {record.pk}: undo merge {blocking.pk} first (newest first)"
            )
        restored = _restore(workspace, record, survivor)
        record.undone_at, record.undone_by = timezone.now(), actor[:255]
        record.save(update_fields=["undone_at", "undone_by"])
        audit.record(
            workspace,
            actor,
            "merge.undo",
            record.pk,
            object_type="merge",
            before={"survivor": survivor.pk, "absorbed": record.absorbed_id, "user_ids": user_ids},
            after={"restored": restored.pk, "survivor": survivor.pk},
        )
        return UndoResult(record=record, restored=restored, survivor=survivor)

    return run_with_retries(once)


def _undone(workspace: Workspace, record: MergeRecord) -> UndoResult:
    users = EndUser.objects.for_workspace(workspace).in_bulk([record.absorbed_id, record.survivor_key])
    return UndoResult(
        record=record,
        restored=users.get(record.absorbed_id),
        survivor=users.get(record.survivor_key),
        already_undone=True,
    )


def _restore(workspace: Workspace, record: MergeRecord, survivor: EndUser) -> EndUser:
    snap = record.absorbed_snapshot
    # The userIds that come back: the absorbed user's, where they still resolve to the survivor.
    held = dict(
        UserIdentity.objects.for_workspace(workspace)
        .filter(user=survivor, external_id__in=snap.get("user_ids") or [])
        .values_list("external_id", "pk")
    )
    moved = [uid for uid in snap.get("user_ids") or [] if uid in held]

    restored = EndUser(workspace=workspace, pk=record.absorbed_id)
    restore_profile(restored, snap)
    restored.user_id = snap.get("user_id") if snap.get("user_id") in held else (moved[0] if moved else None)

    before = snap.get("survivor_before") or {}
    revert_taken_fields(survivor, snap, before)
    if survivor.user_id in held:
        # The survivor took the absorbed user's canonical userId (it had none, or an identify
        # made the payload's id canonical): it gets back its own, else its oldest remaining one.
        remaining = list(
            UserIdentity.objects.for_workspace(workspace)
            .filter(user=survivor)
            .exclude(pk__in=held.values())
            .order_by("created_at", "pk")
            .values_list("external_id", flat=True)
        )
        own = before.get("user_id")
        survivor.user_id = own if own in remaining else (remaining[0] if remaining else None)
    # The survivor first: it may be giving up the canonical userId the restored user takes.
    survivor.save()
    restored.save(force_insert=True)
    UserIdentity.objects.filter(pk__in=held.values()).update(user=restored)
    _restore_memberships(workspace, snap, survivor, restored)
    user_restored.send(
        EndUser, workspace_id=workspace.pk, restored_pk=restored.pk, survivor_pk=survivor.pk, user_ids=moved
    )
    # Earlier merges into the restored user (handed to the survivor when it was absorbed) go back.
    earlier = MergeRecord.objects.for_workspace(workspace).filter(
        survivor_key=survivor.pk, undone_at__isnull=True, pk__lt=record.pk
    )
    for other in earlier:
        if _holder(workspace, other, restored.pk, moved) == restored.pk:
            MergeRecord.objects.filter(pk=other.pk).update(survivor=restored, survivor_key=restored.pk)
    return restored


def _restore_memberships(workspace: Workspace, snap: dict, survivor: EndUser, restored: EndUser) -> None:
    """Memberships the snapshot lists (ledger rows from before they were recorded list none).

    A group only the absorbed user was in takes the membership the merge moved to the
    survivor; a group both were in gives the restored user a membership of its own.
    """
    entries = {entry["group"]: entry for entry in snap.get("groups") or []}
    existing = set(Group.objects.for_workspace(workspace).filter(pk__in=entries).values_list("pk", flat=True))
    moved_groups = [pk for pk, entry in entries.items() if pk in existing and not entry.get("shared")]
    GroupMembership.objects.filter(user=survivor, group_id__in=moved_groups).update(user=restored)
    have = set(GroupMembership.objects.filter(user=restored).values_list("group_id", flat=True))
    GroupMembership.objects.bulk_create(
        [
            GroupMembership(
                workspace=workspace,
                group_id=pk,
                user=restored,
                joined_at=datetime.fromisoformat(entries[pk]["joined_at"]),
            )
            for pk in sorted(existing - have)
        ]
    )
