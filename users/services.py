"""Identity resolution: the one place where users are created, updated, claimed and merged.

Identify calls, alias calls, CSV imports, the REST API and the dashboard all come here.

Concurrency rules (PostgreSQL):
- a transaction first takes advisory locks on the userIds and email it names (sorted), so
  messages about the same person are applied one at a time and see each other's commits;
- then row locks on every user it may change, in one statement ordered by id;
- unique constraints (one identity per userId, one canonical userId per user, one ledger row
  per absorbed user) catch whatever still races, and the whole transaction is retried.
SQLite runs each transaction with BEGIN IMMEDIATE, which serialises them outright.
"""

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from django.db import IntegrityError, OperationalError, transaction
from django.db.models import Q
from django.utils import timezone

from features.models import Usage
from kana.locks import lock_keys
from kana.models import Workspace
from segment_ingest.models import Event

from .models import EndUser, Group, GroupMembership, MergeReason, MergeRecord, UserIdentity
from .profile import ProfileChanges, apply_changes, combine_profiles, snapshot

logger = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs worth a retry: serialization failure, deadlock detected, lock not available.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
MAX_ATTEMPTS = 6


class IdentityError(Exception):
    """A request the identity rules refuse; ``code`` is what the edges report."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


class _StaleRead(Exception):
    """What we read changed under us (e.g. a user deleted concurrently): start again."""


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, (IntegrityError, _StaleRead)):
        return True
    cause = getattr(exc, "__cause__", None)
    return isinstance(exc, OperationalError) and getattr(cause, "sqlstate", None) in _RETRYABLE_SQLSTATES


def run_with_retries(operation: Callable[[], T]) -> T:
    """Run a transactional operation, retrying it on races the database detected.

    Inside an outer transaction the inner ``atomic`` is a savepoint, so a retry rolls back
    only this operation's work.
    """
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return operation()
        except (IntegrityError, OperationalError, _StaleRead) as exc:
            if attempt == MAX_ATTEMPTS or not _is_retryable(exc):
                raise
            logger.info("identity transaction retried", extra={"attempt": attempt, "error": type(exc).__name__})
            time.sleep(random.uniform(0, 0.01 * attempt))
    raise AssertionError("unreachable")


class IdentifyOutcome:
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    CLAIMED = "claimed"
    MERGED = "merged"


@dataclass
class IdentifyResult:
    user: EndUser
    outcome: str
    # Set when the email matched several users and one of them is bare: nothing was merged,
    # the users are flagged (same_email) for an admin to review.
    ambiguous: bool = False
    absorbed_ids: list[int] = field(default_factory=list)


def _identity_lock_keys(workspace: Workspace, user_ids: Iterable[str] = (), email_key: str = "") -> list[str]:
    keys = [f"uid:{workspace.pk}:{uid}" for uid in user_ids]
    if email_key:
        keys.append(f"email:{workspace.pk}:{email_key}")
    return keys


def _owner_of(workspace: Workspace, external_id: str) -> int | None:
    return (
        UserIdentity.objects.for_workspace(workspace)
        .filter(external_id=external_id)
        .values_list("user_id", flat=True)
        .first()
    )


def _oldest_first(users: Iterable[EndUser]) -> list[EndUser]:
    # Survivor = created first; ties broken by the lower id.
    return sorted(users, key=lambda u: (u.created_at, u.pk))


def _create_user(workspace: Workspace, user_id: str | None, changes: ProfileChanges, occurred_at: datetime) -> EndUser:
    user = EndUser(workspace=workspace, user_id=user_id)
    apply_changes(user, changes, occurred_at)
    user.save()
    if user_id:
        UserIdentity.objects.create(workspace=workspace, user=user, external_id=user_id)
    return user


def _absorb(
    *, workspace: Workspace, survivor: EndUser, absorbed: EndUser, reason: str, actor: str, source: str
) -> None:
    """Move everything of ``absorbed`` to ``survivor``, record it, delete ``absorbed``.

    The caller holds row locks on both users and saves the survivor afterwards.
    """
    absorbed_ids = list(
        UserIdentity.objects.filter(user=absorbed).order_by("created_at", "pk").values_list("external_id", flat=True)
    )
    MergeRecord.objects.create(
        workspace=workspace,
        survivor=survivor,
        survivor_key=survivor.pk,
        absorbed_id=absorbed.pk,
        absorbed_snapshot=snapshot(absorbed, absorbed_ids),
        reason=reason,
        actor=actor,
        source=source[:255],
    )
    combine_profiles(survivor, absorbed)
    if not survivor.user_id and absorbed.user_id:
        survivor.user_id = absorbed.user_id
    UserIdentity.objects.filter(user=absorbed).update(user=survivor)
    Event.objects.filter(user=absorbed).update(user=survivor)
    Usage.objects.filter(user=absorbed).update(user=survivor)
    survivor_groups = GroupMembership.objects.filter(user=survivor).values("group_id")
    GroupMembership.objects.filter(user=absorbed, group_id__in=survivor_groups).delete()
    GroupMembership.objects.filter(user=absorbed).update(user=survivor)
    MergeRecord.objects.filter(survivor=absorbed).update(survivor=survivor, survivor_key=survivor.pk)
    # Deleting first frees the absorbed user's canonical userId for the survivor.
    EndUser.objects.filter(pk=absorbed.pk).delete()


def _make_canonical(user: EndUser, user_id: str) -> None:
    user.user_id = user_id


# --- Identify --------------------------------------------------------------------------


def identify_user(
    *,
    workspace: Workspace,
    user_id: str,
    changes: ProfileChanges,
    occurred_at: datetime,
    reason: str = MergeReason.IDENTIFY,
    actor: str = "segment",
    source: str = "",
) -> IdentifyResult:
    """Apply an identify (userId plus profile changes) by Kana's create/update/merge rules.

    U = the user ``user_id`` resolves to; C = the other users with the changes' email.
    Merge (or claim, when there is no U) only when C is exactly one user and it is bare.
    When the email matches several users and one is bare, nothing is merged: flagged.
    """
    return run_with_retries(lambda: _identify_once(workspace, user_id, changes, occurred_at, reason, actor, source))


@transaction.atomic
def _identify_once(workspace, user_id, changes, occurred_at, reason, actor, source) -> IdentifyResult:
    email_key = changes.email_key
    lock_keys(_identity_lock_keys(workspace, [user_id], email_key))
    owner_id = _owner_of(workspace, user_id)
    match = Q(pk=owner_id) if owner_id else Q(pk__in=[])
    if email_key:
        match |= Q(email_key=email_key)
    locked = list(EndUser.objects.for_workspace(workspace).filter(match).order_by("pk").select_for_update())
    user = next((u for u in locked if u.pk == owner_id), None)
    if owner_id and user is None:
        raise _StaleRead()
    others = [u for u in locked if u.pk != owner_id]
    bare_others = [u for u in others if u.is_bare]

    if len(others) == 1 and bare_others:
        target = others[0]
        if user is None:
            # Kana case 8: the bare user (a Stripe import) is claimed by this userId.
            target.user_id = user_id
            UserIdentity.objects.create(workspace=workspace, user=target, external_id=user_id)
            apply_changes(target, changes, occurred_at)
            target.save()
            return IdentifyResult(user=target, outcome=IdentifyOutcome.CLAIMED)
        # Kana case 7: merge into the oldest; the payload's userId becomes canonical.
        survivor, absorbed = _oldest_first([user, target])
        _absorb(workspace=workspace, survivor=survivor, absorbed=absorbed, reason=reason, actor=actor, source=source)
        _make_canonical(survivor, user_id)
        apply_changes(survivor, changes, occurred_at)
        survivor.save()
        return IdentifyResult(user=survivor, outcome=IdentifyOutcome.MERGED, absorbed_ids=[absorbed.pk])

    ambiguous = len(others) > 1 and bool(bare_others)  # Kana cases 9 and 10
    if user is None:
        user = _create_user(workspace, user_id, changes, occurred_at)
        return IdentifyResult(user=user, outcome=IdentifyOutcome.CREATED, ambiguous=ambiguous)
    changed = apply_changes(user, changes, occurred_at)
    if changed:
        user.save()
    outcome = IdentifyOutcome.UPDATED if changed else IdentifyOutcome.UNCHANGED
    return IdentifyResult(user=user, outcome=outcome, ambiguous=ambiguous)


# --- Users without a userId (CSV rows, Stripe imports) ---------------------------------


def upsert_user_by_email(*, workspace: Workspace, changes: ProfileChanges, occurred_at: datetime) -> IdentifyResult:
    """A row with an email and no userId: update the one user with it, or create a bare one.

    Several users with the email is an error: the row must name the user by its kana_id.
    """
    if not changes.email_key:
        raise IdentityError("missing_identifier", "a row needs a kana_id, a user_id or an email", "email")

    @transaction.atomic
    def once() -> IdentifyResult:
        lock_keys(_identity_lock_keys(workspace, email_key=changes.email_key))
        matches = list(
            EndUser.objects.for_workspace(workspace)
            .filter(email_key=changes.email_key)
            .order_by("pk")
            .select_for_update()
        )
        if len(matches) > 1:
            raise IdentityError(
                "ambiguous_email",
                f"{len(matches)} users have the email {changes.email!r}: give the kana_id of the one to update",
                "email",
            )
        if not matches:
            return IdentifyResult(
                user=_create_user(workspace, None, changes, occurred_at), outcome=IdentifyOutcome.CREATED
            )
        user = matches[0]
        changed = apply_changes(user, changes, occurred_at)
        if changed:
            user.save()
        return IdentifyResult(user=user, outcome=IdentifyOutcome.UPDATED if changed else IdentifyOutcome.UNCHANGED)

    return run_with_retries(once)


def update_user(
    *, workspace: Workspace, user_pk: int, changes: ProfileChanges, occurred_at: datetime | None = None
) -> IdentifyResult:
    """Set fields of one user named by its Kana id (REST update, CSV rows with kana_id)."""
    occurred_at = occurred_at or timezone.now()

    @transaction.atomic
    def once() -> IdentifyResult:
        user = EndUser.objects.for_workspace(workspace).select_for_update().filter(pk=user_pk).first()
        if user is None:
            raise IdentityError("unknown_user", f"no user with id {user_pk}", "id")
        changed = apply_changes(user, changes, occurred_at)
        if changed:
            user.save()
        return IdentifyResult(user=user, outcome=IdentifyOutcome.UPDATED if changed else IdentifyOutcome.UNCHANGED)

    return run_with_retries(once)


# --- Track: resolving userIds in bulk --------------------------------------------------


def resolve_users(*, workspace: Workspace, external_ids: Iterable[str]) -> dict[str, int]:
    """Map each userId to its user's id, creating a user (with only that id) for unknown ones.

    Two queries when every id is known, four otherwise. Must run inside the caller's
    transaction; a concurrent creation of the same userId raises IntegrityError, which the
    caller's retry handles.
    """
    wanted = set(external_ids)
    if not wanted:
        return {}
    resolved = dict(
        UserIdentity.objects.for_workspace(workspace)
        .filter(external_id__in=wanted)
        .values_list("external_id", "user_id")
    )
    missing = sorted(wanted - resolved.keys())
    if missing:
        now = timezone.now()
        created = EndUser.objects.bulk_create(
            [EndUser(workspace=workspace, user_id=uid, created_at=now) for uid in missing]
        )
        UserIdentity.objects.bulk_create(
            [UserIdentity(workspace=workspace, user=u, external_id=u.user_id, created_at=now) for u in created]
        )
        resolved.update((u.user_id, u.pk) for u in created)
    return resolved


# --- Alias -----------------------------------------------------------------------------


def alias_user(
    *,
    workspace: Workspace,
    previous_id: str,
    user_id: str,
    occurred_at: datetime,
    actor: str = "segment",
    source: str = "",
) -> IdentifyResult:
    """Make previousId and userId one user: userId is canonical, previousId an alias."""
    if previous_id == user_id:
        raise IdentityError("invalid_alias", "previousId and userId are the same", "previousId")

    @transaction.atomic
    def once() -> IdentifyResult:
        lock_keys(_identity_lock_keys(workspace, [previous_id, user_id]))
        previous_owner, owner = _owner_of(workspace, previous_id), _owner_of(workspace, user_id)
        ids = [i for i in (previous_owner, owner) if i]
        locked = {
            u.pk: u
            for u in EndUser.objects.for_workspace(workspace).filter(pk__in=ids).order_by("pk").select_for_update()
        }
        if any(i not in locked for i in ids):
            raise _StaleRead()
        if not ids:
            user = _create_user(workspace, user_id, ProfileChanges(), occurred_at)
            UserIdentity.objects.create(workspace=workspace, user=user, external_id=previous_id)
            return IdentifyResult(user=user, outcome=IdentifyOutcome.CREATED)
        if previous_owner == owner:
            return IdentifyResult(user=locked[owner], outcome=IdentifyOutcome.UNCHANGED)
        if owner is None:
            user = locked[previous_owner]
            UserIdentity.objects.create(workspace=workspace, user=user, external_id=user_id)
            _make_canonical(user, user_id)
            user.save()
            return IdentifyResult(user=user, outcome=IdentifyOutcome.UPDATED)
        if previous_owner is None:
            user = locked[owner]
            UserIdentity.objects.create(workspace=workspace, user=user, external_id=previous_id)
            return IdentifyResult(user=user, outcome=IdentifyOutcome.UPDATED)
        survivor, absorbed = _oldest_first([locked[previous_owner], locked[owner]])
        _absorb(
            workspace=workspace,
            survivor=survivor,
            absorbed=absorbed,
            reason=MergeReason.ALIAS,
            actor=actor,
            source=source,
        )
        _make_canonical(survivor, user_id)
        survivor.save()
        return IdentifyResult(user=survivor, outcome=IdentifyOutcome.MERGED, absorbed_ids=[absorbed.pk])

    return run_with_retries(once)


# --- Admin merges ----------------------------------------------------------------------


@dataclass
class MergeResult:
    survivor: EndUser
    absorbed_ids: list[int]
    # True when every named user had already been merged into the survivor: nothing changed.
    already_merged: bool = False


def merge_users(
    *,
    workspace: Workspace,
    user_pks: list[int],
    survivor_pk: int | None = None,
    reason: str = MergeReason.ADMIN,
    actor: str = "",
    source: str = "",
) -> MergeResult:
    """Merge users (by Kana id) into one: the oldest, or ``survivor_pk`` when given.

    Idempotent: ids already absorbed are followed through the ledger to their survivor, so
    repeating a merge request finds one user and changes nothing.
    """
    wanted = list(dict.fromkeys(int(pk) for pk in user_pks))
    if survivor_pk is not None and int(survivor_pk) not in wanted:
        wanted.append(int(survivor_pk))
    if len(wanted) < 2:
        raise IdentityError("too_few_users", "name at least two users to merge", "user_ids")

    @transaction.atomic
    def once() -> MergeResult:
        current = {pk: _current_user_pk(workspace, pk) for pk in wanted}
        unknown = [pk for pk, now in current.items() if now is None]
        if unknown:
            raise IdentityError("unknown_user", f"no user with id {unknown[0]} in this workspace", "user_ids")
        targets = sorted(set(current.values()))
        users = list(EndUser.objects.for_workspace(workspace).filter(pk__in=targets).order_by("pk").select_for_update())
        if len(users) != len(targets):
            raise _StaleRead()
        chosen = current[int(survivor_pk)] if survivor_pk is not None else None
        survivor = next(u for u in users if u.pk == chosen) if chosen else _oldest_first(users)[0]
        if len(users) == 1:
            return MergeResult(survivor=survivor, absorbed_ids=[], already_merged=True)
        absorbed_ids = []
        for user in _oldest_first(users):
            if user.pk == survivor.pk:
                continue
            _absorb(workspace=workspace, survivor=survivor, absorbed=user, reason=reason, actor=actor, source=source)
            absorbed_ids.append(user.pk)
        survivor.save()
        return MergeResult(survivor=survivor, absorbed_ids=absorbed_ids)

    return run_with_retries(once)


def _current_user_pk(workspace: Workspace, user_pk: int) -> int | None:
    """The id a user has now: itself, or the survivor it was merged into (followed)."""
    seen = set()
    while user_pk not in seen:
        seen.add(user_pk)
        if EndUser.objects.for_workspace(workspace).filter(pk=user_pk).exists():
            return user_pk
        record = (
            MergeRecord.objects.for_workspace(workspace)
            .filter(absorbed_id=user_pk)
            .values_list("survivor_key", flat=True)
            .first()
        )
        if record is None:
            return None
        user_pk = record
    return None


def delete_user(*, workspace: Workspace, user_pk: int) -> None:
    """Delete a user with its identities and usage; its events stay, detached, for the record."""
    deleted, _ = EndUser.objects.for_workspace(workspace).filter(pk=user_pk).delete()
    if not deleted:
        raise IdentityError("unknown_user", f"no user with id {user_pk}", "id")


# --- Group -----------------------------------------------------------------------------


def record_group(*, workspace: Workspace, user_pk: int, group_id: str, traits: dict, occurred_at: datetime) -> Group:
    """Record the user's membership in a group and the group's traits (newest wins)."""
    group, created = Group.objects.get_or_create(
        workspace=workspace, group_id=group_id, defaults={"traits": traits, "traits_set_at": occurred_at}
    )
    if not created and traits and (group.traits_set_at is None or occurred_at >= group.traits_set_at):
        group.traits, group.traits_set_at = traits, occurred_at
        group.save(update_fields=["traits", "traits_set_at"])
    GroupMembership.objects.get_or_create(
        workspace=workspace, group=group, user_id=user_pk, defaults={"joined_at": occurred_at}
    )
    return group
