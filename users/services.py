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

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from django.db import IntegrityError, OperationalError, connection, models, transaction
from django.db.models import Q
from django.db.models.base import ModelState
from django.utils import timezone

from features.models import Usage
from kana.locks import lock_keys
from kana.models import Workspace
from segment_ingest.models import Event

from .models import EndUser, Group, GroupMembership, MergeReason, MergeRecord, UserIdentity
from .profile import SET_AT_FIELDS, ProfileChanges, absorb_profile, apply_changes, oldest_first, snapshot
from .selectors import user_pk_for

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
    absorb_profile(survivor, absorbed)
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
    restamp_unchanged: bool = True,
) -> IdentifyResult:
    """Apply an identify (userId plus profile changes) by Kana's create/update/merge rules.

    U = the user ``user_id`` resolves to; C = the other users with the changes' email.
    Merge (or claim, when there is no U) only when C is exactly one user and it is bare.
    When the email matches several users and one is bare, nothing is merged: flagged.
    ``restamp_unchanged`` (see ``apply_changes``): True for messages, False for CSV rows.
    """
    return run_with_retries(
        lambda: _identify_once(workspace, user_id, changes, occurred_at, reason, actor, source, restamp_unchanged)
    )


@dataclass
class _IdentifyPlan:
    action: str  # "claim", "merge", "create" or "update"
    target: EndUser | None = None  # the bare user claimed or merged
    ambiguous: bool = False


def _plan_identify(user: EndUser | None, others: list[EndUser]) -> _IdentifyPlan:
    """Kana's rules as a decision, shared by ``identify_user`` and ``apply_profile_rows``.

    ``user`` is U (None when the userId is new), ``others`` is C. Merge (or claim, when there
    is no U) only when C is exactly one user and it is bare; several users with a bare one
    among them is ambiguous: nothing is merged, the users stay flagged (cases 9 and 10).
    """
    bare_others = [u for u in others if u.is_bare]
    if len(others) == 1 and bare_others:
        return _IdentifyPlan("claim" if user is None else "merge", target=others[0])
    ambiguous = len(others) > 1 and bool(bare_others)
    return _IdentifyPlan("create" if user is None else "update", ambiguous=ambiguous)


@transaction.atomic
def _identify_once(workspace, user_id, changes, occurred_at, reason, actor, source, restamp) -> IdentifyResult:
    email_key = changes.email_key
    lock_keys(_identity_lock_keys(workspace, [user_id], email_key))
    owner_id = user_pk_for(workspace, user_id)
    match = Q(pk=owner_id) if owner_id else Q(pk__in=[])
    if email_key:
        match |= Q(email_key=email_key)
    locked = list(EndUser.objects.for_workspace(workspace).filter(match).order_by("pk").select_for_update())
    user = next((u for u in locked if u.pk == owner_id), None)
    if owner_id and user is None:
        raise _StaleRead()
    plan = _plan_identify(user, [u for u in locked if u.pk != owner_id])

    if plan.action == "claim":
        # Kana case 8: the bare user (a Stripe import) is claimed by this userId.
        target = plan.target
        target.user_id = user_id
        UserIdentity.objects.create(workspace=workspace, user=target, external_id=user_id)
        apply_changes(target, changes, occurred_at, restamp_unchanged=restamp)
        target.save()
        return IdentifyResult(user=target, outcome=IdentifyOutcome.CLAIMED)
    if plan.action == "merge":
        # Kana case 7: merge into the oldest; the payload's userId becomes canonical.
        survivor, absorbed = oldest_first([user, plan.target])
        _absorb(workspace=workspace, survivor=survivor, absorbed=absorbed, reason=reason, actor=actor, source=source)
        _make_canonical(survivor, user_id)
        apply_changes(survivor, changes, occurred_at, restamp_unchanged=restamp)
        survivor.save()
        return IdentifyResult(user=survivor, outcome=IdentifyOutcome.MERGED, absorbed_ids=[absorbed.pk])
    if plan.action == "create":
        user = _create_user(workspace, user_id, changes, occurred_at)
        return IdentifyResult(user=user, outcome=IdentifyOutcome.CREATED, ambiguous=plan.ambiguous)
    stamps = [getattr(user, name) for name in SET_AT_FIELDS]
    changed = apply_changes(user, changes, occurred_at, restamp_unchanged=restamp)
    if changed:
        user.save()
    elif stamps != [getattr(user, name) for name in SET_AT_FIELDS]:
        # Same values, confirmed by a newer message: keep its time, not a profile change.
        user.save(update_fields=SET_AT_FIELDS)
    outcome = IdentifyOutcome.UPDATED if changed else IdentifyOutcome.UNCHANGED
    return IdentifyResult(user=user, outcome=outcome, ambiguous=plan.ambiguous)


# --- Users without a userId (CSV rows, Stripe imports) ---------------------------------


def _missing_identifier() -> IdentityError:
    return IdentityError("missing_identifier", "a row needs a kana_id, a user_id or an email", "email")


def _ambiguous_email(count: int, changes: ProfileChanges) -> IdentityError:
    return IdentityError(
        "ambiguous_email",
        f"{count} users have the email {changes.email!r}: give the kana_id of the one to update",
        "email",
    )


def upsert_user_by_email(*, workspace: Workspace, changes: ProfileChanges, occurred_at: datetime) -> IdentifyResult:
    """A row with an email and no userId: update the one user with it, or create a bare one.

    Several users with the email is an error: the row must name the user by its kana_id.
    """
    if not changes.email_key:
        raise _missing_identifier()

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
            raise _ambiguous_email(len(matches), changes)
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


# --- Rows naming users by kana_id, userId or email (CSV import) -----------------------


@dataclass
class ProfileRow:
    """One user's changes, named by Kana id (``user_pk``), by userId, or only by email.

    ``user_pk`` rows go to ``update_user`` (a ``user_id`` beside it must resolve to that very
    user), ``user_id`` rows to ``identify_user``, the rest to ``upsert_user_by_email``.
    """

    changes: ProfileChanges
    user_pk: int | None = None
    user_id: str | None = None
    label: str = ""  # where the row comes from ("row 12"): ledger source and error messages


RowOutcome = IdentifyResult | IdentityError


def _user_id_mismatch(row: ProfileRow) -> IdentityError:
    return IdentityError(
        "user_id_mismatch",
        f"user_id {row.user_id!r} is not a userId of kana_id {row.user_pk}; to give a user without a userId "
        "one, leave kana_id empty (the row then claims the bare user with the same email)",
        "user_id",
    )


def _duplicate_row(first_label: str) -> IdentityError:
    return IdentityError("duplicate_row", f"the same user is already named by {first_label}", "kana_id")


def _touched_by(result: IdentifyResult) -> list[int]:
    return [result.user.pk, *result.absorbed_ids]


class TouchedUsers:
    """The users earlier rows of one import named (user pk -> row label), for ``duplicate_row``.

    On PostgreSQL the pairs live in a temporary table of the import's transaction, not in
    this process: memory stays flat whatever the file's size (a dict costs ~140 bytes a row).
    Use it inside one transaction. Elsewhere it is a dict. ``apply_profile_rows`` and its
    per-row twin also accept a plain dict.
    """

    _TABLE = "kana_csv_touched_users"

    def __init__(self):
        self._memory: dict[int, str] | None = None if connection.vendor == "postgresql" else {}
        self._created = False

    def labels_of(self, pks: Iterable[int]) -> dict[int, str]:
        pks = [pk for pk in pks if pk is not None]
        if self._memory is not None:
            return {pk: self._memory[pk] for pk in pks if pk in self._memory}
        if not self._created or not pks:
            return {}
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT user_pk, label FROM {self._TABLE} WHERE user_pk = ANY(%s::bigint[])", [_int_array(pks)]
            )
            return dict(cursor.fetchall())

    def update(self, pairs: Iterable[tuple[int, str]]) -> None:
        pairs = dict(pairs)
        if self._memory is not None:
            self._memory.update(pairs)
            return
        if not pairs:
            return
        with connection.cursor() as cursor:
            if not self._created:
                # An earlier import in the same transaction (tests) may have left one.
                cursor.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {self._TABLE} (user_pk bigint PRIMARY KEY, label text NOT NULL) "
                    "ON COMMIT DROP"
                )
                cursor.execute(f"TRUNCATE {self._TABLE}")
                self._created = True
            cursor.execute(
                f"INSERT INTO {self._TABLE} (user_pk, label) SELECT * FROM unnest(%s::bigint[], %s::text[]) "
                "ON CONFLICT (user_pk) DO UPDATE SET label = EXCLUDED.label",
                [_int_array(pairs), _text_array(pairs.values())],
            )


def _labels_of(touched: "dict[int, str] | TouchedUsers", pks: Iterable[int]) -> dict[int, str]:
    if isinstance(touched, TouchedUsers):
        return touched.labels_of(pks)
    return {pk: touched[pk] for pk in pks if pk in touched}


def apply_profile_row(
    *,
    workspace: Workspace,
    row: ProfileRow,
    occurred_at: datetime,
    reason: str = MergeReason.CSV,
    actor: str = "",
    source: str = "",
) -> IdentifyResult:
    """Apply one row with the per-message services (advisory locks, a transaction of its own)."""
    if row.user_pk is not None:
        if (
            row.user_id is not None
            and user_pk_for(workspace, row.user_id) != row.user_pk
            and EndUser.objects.for_workspace(workspace).filter(pk=row.user_pk).exists()
        ):
            raise _user_id_mismatch(row)
        return update_user(workspace=workspace, user_pk=row.user_pk, changes=row.changes, occurred_at=occurred_at)
    if row.user_id is not None:
        return identify_user(
            workspace=workspace,
            user_id=row.user_id,
            changes=row.changes,
            occurred_at=occurred_at,
            reason=reason,
            actor=actor,
            source=source or row.label,
            restamp_unchanged=False,
        )
    return upsert_user_by_email(workspace=workspace, changes=row.changes, occurred_at=occurred_at)


def apply_profile_rows_singly(
    *,
    workspace: Workspace,
    rows: list[ProfileRow],
    occurred_at: datetime,
    touched: "dict[int, str] | TouchedUsers",
    reason: str = MergeReason.CSV,
    actor: str = "",
) -> list[RowOutcome]:
    """Rows one at a time through ``apply_profile_row``: the reference for ``apply_profile_rows``.

    A row naming a user that an earlier row (``touched``: user pk -> row label, kept by the
    caller across calls) already changed, claimed, merged or left unchanged is a
    ``duplicate_row`` error and leaves no trace (its savepoint is rolled back).
    """
    outcomes: list[RowOutcome] = []
    for row in rows:
        try:
            with transaction.atomic():
                result = apply_profile_row(
                    workspace=workspace, row=row, occurred_at=occurred_at, reason=reason, actor=actor
                )
                earlier = _labels_of(touched, _touched_by(result))
                seen = next((earlier[pk] for pk in _touched_by(result) if pk in earlier), None)
                if seen is not None:
                    raise _duplicate_row(seen)
        except IdentityError as error:
            outcomes.append(error)
            continue
        touched.update((pk, row.label) for pk in _touched_by(result))
        outcomes.append(result)
    return outcomes


def apply_profile_rows(
    *,
    workspace: Workspace,
    rows: list[ProfileRow],
    occurred_at: datetime,
    touched: "dict[int, str] | TouchedUsers",
    reason: str = MergeReason.CSV,
    actor: str = "",
) -> list[RowOutcome]:
    """Set-based twin of ``apply_profile_rows_singly``: same outcomes, a few queries per call.

    Reads every user the rows can concern in two queries (locking them in id order), applies
    the rows in order to those objects with the same decision (``_plan_identify``), field
    rules (``apply_changes``) and merge step (``_absorb``) as the per-row services, then
    writes creations, claims and updates in bulk. Runs in a savepoint, retried as a whole.

    It takes no advisory locks: a file names far more userIds and emails than PostgreSQL's
    lock table holds, and the import's transaction keeps its locks to the end. Row locks and
    the unique constraints still order it against concurrent identifies; what is lost is
    only that an identify naming an email this call is setting at the same moment may not
    see it, leaving two users flagged ``same_email`` instead of merged.
    """
    outcomes, newly_touched = run_with_retries(
        lambda: _apply_rows_once(workspace, rows, occurred_at, touched, reason, actor)
    )
    touched.update(newly_touched)
    return outcomes


class _RowState:
    """The users a batch of rows concerns, indexed by userId and email, changed in memory."""

    def __init__(self, workspace: Workspace, rows: list[ProfileRow]):
        self.workspace = workspace
        user_ids = {row.user_id for row in rows if row.user_id is not None}
        owners = _owners(workspace, user_ids)
        pks = {row.user_pk for row in rows if row.user_pk is not None} | set(owners.values())
        emails = {row.changes.email_key for row in rows} - {""}
        self.by_pk: dict[int, EndUser] = {user.pk: user for user in _lock_users(workspace, pks, emails)}
        if any(pk not in self.by_pk for pk in owners.values()):
            raise _StaleRead()  # a user deleted since its identity was read
        self.owner: dict[str, EndUser] = {uid: self.by_pk[pk] for uid, pk in owners.items()}
        self.by_email: dict[str, list[EndUser]] = defaultdict(list)
        for user in self.by_pk.values():
            if user.email_key:
                self.by_email[user.email_key].append(user)
        self.merged_into: dict[int, EndUser] = {}  # id(absorbed) -> survivor
        self.created: list[EndUser] = []
        self.identities: list[tuple[EndUser, str]] = []
        self.dirty: dict[int, EndUser] = {}  # existing users to write back, by id()
        self._blank: dict | None = None

    def _new_user(self, user_id: str | None) -> EndUser:
        """``EndUser(workspace=..., user_id=...)`` at a tenth of the cost.

        The model's constructor walks every field per call (~70 µs, the largest per-row cost
        of an import creating users); this copies the attributes of one constructed instance
        and sets the per-instance defaults (``created_at``, ``audiences``) as it would.
        """
        if self._blank is None:
            self._blank = vars(EndUser(workspace=self.workspace)).copy()
            del self._blank["_state"]
        user = EndUser.__new__(EndUser)
        state = ModelState()
        state.fields_cache["workspace"] = self.workspace
        user.__dict__.update(self._blank, _state=state, user_id=user_id, audiences={}, created_at=timezone.now())
        return user

    def owner_of(self, user_id: str) -> EndUser | None:
        user = self.owner.get(user_id)
        while user is not None and id(user) in self.merged_into:
            user = self.merged_into[id(user)]
        return user

    def with_email(self, email_key: str) -> list[EndUser]:
        return list(self.by_email.get(email_key, ())) if email_key else []

    def changed(self, user: EndUser, old_email_key: str) -> None:
        if user.email_key != old_email_key:
            if old_email_key:
                self.by_email[old_email_key].remove(user)
            if user.email_key:
                self.by_email[user.email_key].append(user)
        if user.pk is not None:
            self.dirty[id(user)] = user

    def create(self, user_id: str | None, changes: ProfileChanges, occurred_at: datetime) -> EndUser:
        user = self._new_user(user_id)
        apply_changes(user, changes, occurred_at)
        self.created.append(user)
        if user.email_key:
            self.by_email[user.email_key].append(user)
        if user_id:
            self.owner[user_id] = user
            self.identities.append((user, user_id))
        return user

    def forget(self, absorbed: EndUser, survivor: EndUser) -> None:
        if absorbed.email_key:
            self.by_email[absorbed.email_key].remove(absorbed)
        self.merged_into[id(absorbed)] = survivor
        self.dirty.pop(id(absorbed), None)


_BULK_FIELDS = [
    "user_id",
    "name",
    "name_set_at",
    "email",
    "email_key",
    "email_set_at",
    "billing_id",
    "billing_provider",
    "billing_set_at",
    "audiences",
    "updated_at",
]


def _apply_rows_once(workspace, rows, occurred_at, touched, reason, actor):
    with transaction.atomic():
        state = _RowState(workspace, rows)
        planned: list[tuple[ProfileRow, RowOutcome]] = []
        touched_here: dict[int, str] = {}  # id(user) -> label, for users of this batch
        # Every existing user a row can name is one of the batch's users, read above.
        earlier = _labels_of(touched, state.by_pk)

        def seen_by(users) -> str | None:
            for user in users:
                if user.pk is not None and user.pk in earlier:
                    return earlier[user.pk]
                if id(user) in touched_here:
                    return touched_here[id(user)]
            return None

        for row in rows:
            try:
                result = _apply_row_in_memory(state, row, occurred_at, reason, actor, seen_by)
            except IdentityError as error:
                planned.append((row, error))
                continue
            for user in (result.user, *result.absorbed_users):
                touched_here[id(user)] = row.label
            planned.append((row, result.as_result()))

        _write_back(state, occurred_at)
        newly_touched: dict[int, str] = {}
        outcomes: list[RowOutcome] = []
        for row, outcome in planned:
            if isinstance(outcome, IdentifyResult):
                newly_touched.update((pk, row.label) for pk in _touched_by(outcome))
            outcomes.append(outcome)
        return outcomes, newly_touched


@dataclass
class _InMemoryResult:
    user: EndUser
    outcome: str
    ambiguous: bool = False
    absorbed_users: tuple[EndUser, ...] = ()

    def as_result(self) -> IdentifyResult:
        # An absorbed user's row is deleted, but the instance keeps its pk.
        absorbed_ids = [u.pk for u in self.absorbed_users]
        return IdentifyResult(user=self.user, outcome=self.outcome, ambiguous=self.ambiguous, absorbed_ids=absorbed_ids)


def _apply_row_in_memory(state: _RowState, row: ProfileRow, occurred_at, reason, actor, seen_by) -> _InMemoryResult:
    """One row against the batch's users, in the order and with the checks of the per-row path."""
    changes = row.changes

    def update(user: EndUser, ambiguous: bool = False) -> _InMemoryResult:
        first = seen_by([user])
        if first is not None:
            raise _duplicate_row(first)
        old_key = user.email_key
        if not apply_changes(user, changes, occurred_at):
            return _InMemoryResult(user, IdentifyOutcome.UNCHANGED, ambiguous)
        state.changed(user, old_key)
        return _InMemoryResult(user, IdentifyOutcome.UPDATED, ambiguous)

    if row.user_pk is not None:
        user = state.by_pk.get(row.user_pk)
        if user is None or id(user) in state.merged_into:
            raise IdentityError("unknown_user", f"no user with id {row.user_pk}", "id")
        if row.user_id is not None and state.owner_of(row.user_id) is not user:
            raise _user_id_mismatch(row)
        return update(user)

    if row.user_id is None:
        if not changes.email_key:
            raise _missing_identifier()
        matches = state.with_email(changes.email_key)
        if len(matches) > 1:
            raise _ambiguous_email(len(matches), changes)
        if not matches:
            return _InMemoryResult(state.create(None, changes, occurred_at), IdentifyOutcome.CREATED)
        return update(matches[0])

    user = state.owner_of(row.user_id)
    plan = _plan_identify(user, [u for u in state.with_email(changes.email_key) if u is not user])
    if plan.action == "create":
        created = state.create(row.user_id, changes, occurred_at)
        return _InMemoryResult(created, IdentifyOutcome.CREATED, plan.ambiguous)
    if plan.action == "update":
        return update(user, plan.ambiguous)
    first = seen_by([u for u in (user, plan.target) if u is not None])
    if first is not None:
        raise _duplicate_row(first)
    target = plan.target
    if plan.action == "claim":
        old_key = target.email_key
        target.user_id = row.user_id
        state.owner[row.user_id] = target
        state.identities.append((target, row.user_id))
        apply_changes(target, changes, occurred_at)
        state.changed(target, old_key)
        return _InMemoryResult(target, IdentifyOutcome.CLAIMED)
    survivor, absorbed = oldest_first([user, target])
    old_key = survivor.email_key
    _absorb(
        workspace=state.workspace, survivor=survivor, absorbed=absorbed, reason=reason, actor=actor, source=row.label
    )
    state.forget(absorbed, survivor)
    _make_canonical(survivor, row.user_id)
    apply_changes(survivor, changes, occurred_at)
    state.changed(survivor, old_key)
    return _InMemoryResult(survivor, IdentifyOutcome.MERGED, absorbed_users=(absorbed,))


def _write_back(state: _RowState, occurred_at: datetime) -> None:
    """Creations, claims and updates of one batch: a few statements whatever its size."""
    now = timezone.now()
    if connection.vendor == "postgresql":
        for user in state.created:
            user.updated_at = now
        _copy_in(state.created)
        # Identities as plain rows (the users got their ids just above): what
        # UserIdentity(workspace=..., user=..., external_id=...) would insert, one timestamp.
        _copy_rows(
            UserIdentity._meta.db_table,
            ("workspace_id", "user_id", "external_id", "created_at"),
            [(state.workspace.pk, user.pk, uid, now) for user, uid in state.identities],
        )
    else:
        identities = [
            UserIdentity(workspace=state.workspace, user=user, external_id=uid) for user, uid in state.identities
        ]
        EndUser.objects.bulk_create(state.created, batch_size=1000)
        UserIdentity.objects.bulk_create(identities, batch_size=1000)
    if state.dirty:
        for user in state.dirty.values():
            user.updated_at = now
        _update_users(list(state.dirty.values()))


# The two helpers below bypass the ORM on PostgreSQL, measured on CSV imports: Django's
# timestamptz loader is pure Python (~10 µs a value, five per user) and ``bulk_update``
# builds a CASE expression per row and field (milliseconds per row). Both keep the ORM's
# semantics: the same rows, columns and values.


def _owners(workspace: Workspace, user_ids: set[str]) -> dict[str, int]:
    """userId -> user pk for those of ``user_ids`` the workspace knows."""
    if connection.vendor != "postgresql":
        identities = UserIdentity.objects.for_workspace(workspace).filter(external_id__in=user_ids)
        return dict(identities.values_list("external_id", "user_id"))
    # One array parameter: an IN list of 1,000 placeholders costs psycopg ~25 ms to parse.
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT external_id, user_id FROM {connection.ops.quote_name(UserIdentity._meta.db_table)} "
            "WHERE workspace_id = %s AND external_id = ANY(%s::text[])",
            [workspace.pk, _text_array(user_ids)],
        )
        return dict(cursor.fetchall())


def _int_array(values: Iterable[int]) -> str:
    """A PostgreSQL array literal (cast it: ``%s::bigint[]``); psycopg's list dumper costs ~3 µs an item."""
    return "{" + ",".join(str(int(value)) for value in values) + "}"


def _text_array(values: Iterable[str]) -> str:
    """A PostgreSQL array literal of strings, each quoted (cast it: ``%s::text[]``)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def _lock_users(workspace: Workspace, pks: set[int], email_keys: set[str]) -> list[EndUser]:
    """The workspace's users with these ids or email keys, row-locked in id order."""
    users = EndUser.objects.for_workspace(workspace)
    if connection.vendor != "postgresql":
        match = Q(pk__in=pks) | Q(email_key__in=email_keys) if email_keys else Q(pk__in=pks)
        return list(users.filter(match).order_by("pk").select_for_update())
    fields = EndUser._meta.concrete_fields
    quote = connection.ops.quote_name
    as_text = (models.DateTimeField, models.JSONField)
    columns = ", ".join(f"{quote(f.column)}::text" if isinstance(f, as_text) else quote(f.column) for f in fields)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {columns} FROM {quote(EndUser._meta.db_table)} "
            "WHERE workspace_id = %s AND (id = ANY(%s::bigint[]) OR email_key = ANY(%s::text[])) "
            "ORDER BY id FOR UPDATE",
            [workspace.pk, _int_array(pks), _text_array(email_keys)],
        )
        rows = cursor.fetchall()
    parsed = [(f.attname, _text_parser(f)) for f in fields]
    users = []
    for row in rows:
        # What EndUser.from_db() builds (attributes by field, a saved _state) without the
        # model constructor's walk over every field (~30 µs a user).
        user = EndUser.__new__(EndUser)
        state = ModelState()
        state.adding, state.db = False, connection.alias
        user._state = state
        user.__dict__.update(
            (name, value if parse is None or value is None else parse(value))
            for (name, parse), value in zip(parsed, row, strict=True)
        )
        users.append(user)
    return users


def _text_parser(field: models.Field) -> Callable[[str], object] | None:
    if isinstance(field, models.DateTimeField):
        # The session's TimeZone is UTC (Django sets it): "2024-01-01 10:00:00.123+00".
        return datetime.fromisoformat
    if isinstance(field, models.JSONField):
        return json.loads
    return None


def _copy_in(objects: list[models.Model]) -> None:
    """Insert new rows with COPY, their ids drawn from the table's sequence first (PostgreSQL).

    ``bulk_create`` prepares every value through the ORM, about 100 µs a row for a user and
    its identity; COPY takes the values as they are. Same rows, same defaults (the objects
    were built by their model's constructor).
    """
    if not objects:
        return
    meta = objects[0]._meta
    table = meta.db_table
    fields = [f for f in meta.concrete_fields]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)", [table, len(objects)]
        )
        for obj, (pk,) in zip(objects, cursor.fetchall(), strict=True):
            obj.pk = pk
            obj._state.adding = False
        quote = connection.ops.quote_name
        columns = ", ".join(quote(f.column) for f in fields)
        json_fields = {f.attname for f in fields if isinstance(f, models.JSONField)}
        with cursor.cursor.copy(f"COPY {quote(table)} ({columns}) FROM STDIN") as copy:
            for obj in objects:
                copy.write_row(
                    [
                        json.dumps(getattr(obj, f.attname)) if f.attname in json_fields else getattr(obj, f.attname)
                        for f in fields
                    ]
                )


def _copy_rows(table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """COPY plain rows into ``table`` (PostgreSQL); ids come from the column default."""
    if not rows:
        return
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        with cursor.cursor.copy(f"COPY {quote(table)} ({', '.join(map(quote, columns))}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


# Rows per UPDATE statement on SQLite: 500 rows x 12 parameters stays below its limit.
_UPDATE_BATCH = 500


def _update_users(users: list[EndUser]) -> None:
    """Write back users' profile fields: one UPDATE joined to the new values per batch."""
    fields = [EndUser._meta.get_field(name) for name in _BULK_FIELDS]
    table = connection.ops.quote_name(EndUser._meta.db_table)
    columns = [connection.ops.quote_name(f.column) for f in fields]
    if connection.vendor == "postgresql":
        # COPY the new values into a scratch table (dropped at commit), then one UPDATE joins it.
        quote = connection.ops.quote_name
        scratch = quote("kana_csv_user_changes")
        json_fields = {f.attname for f in fields if isinstance(f, models.JSONField)}
        with connection.cursor() as cursor:
            cursor.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {scratch} ON COMMIT DROP AS "
                f"SELECT id, {', '.join(columns)} FROM {table} WITH NO DATA"
            )
            with cursor.cursor.copy(f"COPY {scratch} (id, {', '.join(columns)}) FROM STDIN") as copy:
                for user in users:
                    copy.write_row(
                        [
                            user.pk,
                            *(
                                json.dumps(getattr(user, f.attname))
                                if f.attname in json_fields
                                else getattr(user, f.attname)
                                for f in fields
                            ),
                        ]
                    )
            assignments = ", ".join(f"{column} = v.{column}" for column in columns)
            cursor.execute(f"UPDATE {table} SET {assignments} FROM {scratch} AS v WHERE {table}.id = v.id")
            cursor.execute(f"TRUNCATE {scratch}")
        return
    placeholder = "(" + ", ".join(["%s"] * (len(fields) + 1)) + ")"
    assignments = ", ".join(f"{column} = v.{column}" for column in columns)
    with connection.cursor() as cursor:
        for start in range(0, len(users), _UPDATE_BATCH):
            batch = users[start : start + _UPDATE_BATCH]
            params = []
            for user in batch:
                params.append(user.pk)
                params.extend(f.get_db_prep_save(getattr(user, f.attname), connection) for f in fields)
            cursor.execute(
                f"WITH v (id, {', '.join(columns)}) AS (VALUES {', '.join([placeholder] * len(batch))}) "
                f"UPDATE {table} SET {assignments} FROM v WHERE {table}.id = v.id",
                params,
            )


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
        previous_owner, owner = user_pk_for(workspace, previous_id), user_pk_for(workspace, user_id)
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
        survivor, absorbed = oldest_first([locked[previous_owner], locked[owner]])
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
        survivor = next(u for u in users if u.pk == chosen) if chosen else oldest_first(users)[0]
        if len(users) == 1:
            return MergeResult(survivor=survivor, absorbed_ids=[], already_merged=True)
        absorbed_ids = []
        for user in oldest_first(users):
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
        if not users.select_for_update().values_list("pk", flat=True):
            raise IdentityError("unknown_user", f"no user with id {user_pk}", "id")
        users.delete()

    run_with_retries(once)


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
