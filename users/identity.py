"""The identity engine: the one place where Kana's identify rules create, update, claim and
merge users, for a Segment message and for a CSV batch alike.

Every entry point (``identify_user``, ``upsert_user_by_email``, ``update_user``,
``apply_profile_rows``) turns its input into ``ProfileRow``s and runs the same three steps:
1. read every user the rows can concern, row-locked in id order (``users.bulk.lock_users``);
2. apply the rows in order to those objects in memory (``_apply_row``: the decision
   ``_plan_identify``, the field rules ``apply_changes``, the merge step ``absorb``); in a
   CSV batch, the rows that can only create (``_rows_that_only_create``: nothing they name
   exists or is named by another row) are recognised for the whole batch from that read and
   created directly, with the same field rules;
3. write back what changed, set-based (``_write_back``).
A message and a file differ only in size, in ``restamp`` (a message restamps values it
repeats, a file row does not) and in locking: a message first takes advisory locks on its
userId and email, so messages about one person apply one at a time and see each other's
commits; a file takes none (it names more keys than PostgreSQL's lock table holds), and its
row locks and the unique constraints order it against concurrent messages.

What still races (a user deleted between read and lock, a unique violation) re-runs the
whole transaction (``kana.retries``). SQLite runs each transaction with BEGIN IMMEDIATE,
which serialises them outright.
"""

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

from django.conf import settings
from django.db import connection, transaction
from django.db.models.base import ModelState
from django.utils import timezone

from kana import audit
from kana.db import kept_cursor, prepared
from kana.locks import lock_keys, lock_keys_and_read
from kana.models import Workspace
from kana.retries import ConcurrentChange, run_with_retries

from . import bulk
from .errors import IdentityError
from .merges import absorb
from .models import EndUser, MergeReason, Suppression, UserIdentity
from .profile import SET_AT_FIELDS, UNSET, ProfileChanges, apply_changes, oldest_first

logger = logging.getLogger(__name__)


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


def identity_lock_keys(workspace: Workspace, user_ids: Iterable[str] = (), email_key: str = "") -> list[str]:
    keys = [f"uid:{workspace.pk}:{uid}" for uid in user_ids]
    if email_key:
        keys.append(f"email:{workspace.pk}:{email_key}")
    return keys


@dataclass
class _IdentifyPlan:
    action: str  # "claim", "merge", "create" or "update"
    target: EndUser | None = None  # the bare user claimed or merged
    ambiguous: bool = False


def _plan_identify(user: EndUser | None, others: list[EndUser]) -> _IdentifyPlan:
    """Kana's rules as a decision.

    ``user`` is U (None when the userId is new), ``others`` is C. Merge (or claim, when there
    is no U) only when C is exactly one user and it is bare; several users with a bare one
    among them is ambiguous: nothing is merged, the users stay flagged (cases 9 and 10).
    """
    bare_others = [u for u in others if u.is_bare]
    if len(others) == 1 and bare_others:
        return _IdentifyPlan("claim" if user is None else "merge", target=others[0])
    ambiguous = len(others) > 1 and bool(bare_others)
    return _IdentifyPlan("create" if user is None else "update", ambiguous=ambiguous)


def _missing_identifier() -> IdentityError:
    return IdentityError("missing_identifier", "a row needs a kana_id, a user_id or an email", "email")


def _ambiguous_email(count: int, changes: ProfileChanges) -> IdentityError:
    return IdentityError(
        "ambiguous_email",
        f"{count} users have the email {changes.email!r}: give the kana_id of the one to update",
        "email",
    )


def _user_id_mismatch(row: "ProfileRow") -> IdentityError:
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


@dataclass
class ProfileRow:
    """One user's changes, named by Kana id (``user_pk``), by userId, or only by email.

    A ``user_pk`` row updates that user (a ``user_id`` beside it must resolve to that very
    user); a ``user_id`` row follows the identify rules; an email-only row updates the one
    user with that email or creates a bare one.
    """

    changes: ProfileChanges
    user_pk: int | None = None
    user_id: str | None = None
    label: str = ""  # where the row comes from ("row 12", "message:<id>"): ledger source, errors


RowOutcome = IdentifyResult | IdentityError


class TouchedUsers:
    """The users earlier rows of one import named (user pk -> row label), for ``duplicate_row``.

    On PostgreSQL the pairs live in a temporary table of the import's transaction, not in
    this process: memory stays flat whatever the file's size (a dict costs ~140 bytes a row).
    Use it inside one transaction. Elsewhere it is a dict. ``apply_profile_rows`` also
    accepts a plain dict.
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
                f"SELECT user_pk, label FROM {self._TABLE} WHERE user_pk = ANY(%s::bigint[])", [bulk.int_array(pks)]
            )
            return dict(cursor.fetchall())

    def update(self, pairs: Iterable[tuple[int, str]], *, created: Iterable[tuple[int, str]] = ()) -> None:
        """Remember ``pairs`` (user pk -> label), a later pair of a pk replacing an earlier one.

        ``created``: pairs of users these rows created, whose ids were just drawn from the
        users' sequence, so no earlier pair can have them: they are inserted without
        ``ON CONFLICT``, whose speculative insertion cost PostgreSQL ≈ 1 µs a pair more
        (2.0 against 1.05 µs, 100 chunks of 1,000 pairs), on an import's every created user.
        """
        pairs, created = dict(pairs), dict(created)
        if self._memory is not None:
            self._memory.update(created)
            self._memory.update(pairs)
            return
        if not pairs and not created:
            return
        table = self._TABLE
        statements, params = [], []
        if created:
            statements.append(f"INSERT INTO {table} (user_pk, label) SELECT * FROM unnest(%s::bigint[], %s::text[])")
            params += [bulk.int_array(created), bulk.text_array(created.values())]
        if pairs:
            statements.append(
                f"INSERT INTO {table} (user_pk, label) SELECT * FROM unnest(%s::bigint[], %s::text[]) "
                "ON CONFLICT (user_pk) DO UPDATE SET label = EXCLUDED.label"
            )
            params += [bulk.int_array(pairs), bulk.text_array(pairs.values())]
        # Both kinds in one statement (one round trip): the two sets of pks are disjoint.
        sql = f"WITH created AS ({statements[0]}) {statements[1]}" if len(statements) == 2 else statements[0]
        with connection.cursor() as cursor:
            if not self._created:
                # An earlier import in the same transaction (tests) may have left one.
                cursor.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {table} (user_pk bigint PRIMARY KEY, label text NOT NULL) "
                    "ON COMMIT DROP"
                )
                cursor.execute(f"TRUNCATE {table}")
                self._created = True
            cursor.execute(sql, params)


def _labels_of(touched: "dict[int, str] | TouchedUsers", pks: Iterable[int]) -> dict[int, str]:
    if isinstance(touched, TouchedUsers):
        return touched.labels_of(pks)
    return {pk: touched[pk] for pk in pks if pk in touched}


def _remember(touched: "dict[int, str] | TouchedUsers", pairs: dict[int, str], *, created: dict[int, str]) -> None:
    """``touched`` learns ``pairs`` and the ``created`` users' pairs (``TouchedUsers.update``)."""
    if isinstance(touched, TouchedUsers):
        touched.update(pairs, created=created)
    else:
        touched.update(created)
        touched.update(pairs)


class _NewUsers:
    """New users of one workspace, ``EndUser(workspace=..., user_id=...)`` at a tenth of the cost,
    with a row's changes applied.

    The model's constructor walks every field per call (~70 µs, the largest per-row cost of an
    import creating users); this copies the attributes of one constructed instance and sets
    the per-instance defaults (``created_at``, ``audiences``) as it would.
    """

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.blank = vars(EndUser(workspace=workspace)).copy()
        del self.blank["_state"]
        # ``timezone.now()`` reads settings.USE_TZ through the lazy settings object on every
        # call (~1.5 µs, a tenth of an imported row's engine time): read it once.
        self.now = partial(datetime.now, UTC) if settings.USE_TZ else datetime.now

    def build(self, user_id: str | None, changes: ProfileChanges, occurred_at: datetime, restamp: bool) -> EndUser:
        user = EndUser.__new__(EndUser)
        state = ModelState()
        state.fields_cache["workspace"] = self.workspace
        user.__dict__.update(self.blank, _state=state, user_id=user_id, audiences={}, created_at=self.now())
        apply_changes(user, changes, occurred_at, restamp_unchanged=restamp)
        return user


def build_new_users(*, workspace: Workspace, rows: list[ProfileRow], occurred_at: datetime) -> list[EndUser | None]:
    """The user each of a CSV batch's rows would create, built ahead of ``apply_profile_rows``
    (its ``new_users``) from the same arguments; None for a kana_id row, which never creates.

    Building a new user is the engine's only per-row work that needs nothing read: ≈ 4 µs a
    row, which the CSV import does while PostgreSQL runs the previous chunk's deferred checks
    (``users.csv_import._ChecksPerChunk``) instead of after the batch's read. Whether a row
    creates is still decided by the engine, after its read, exactly as without them: a row
    that only creates takes its built user, any other row's is dropped (and a row that creates
    on the general path builds its own there).
    """
    new_users = _NewUsers(workspace)
    return [
        new_users.build(row.user_id, row.changes, occurred_at, False) if row.user_pk is None else None for row in rows
    ]


class _CreatedInThisPass(Exception):
    """A merge would absorb, or survive into, a user this pass created and has not written."""


# --- The engine --------------------------------------------------------------------------


class _Batch:
    """The users a batch of rows concerns, indexed by userId and email, changed in memory."""

    def __init__(
        self, workspace: Workspace, rows: list[ProfileRow], read: tuple[dict[str, int], list[EndUser]] | None = None
    ):
        """``read``: the rows' userId owners and locked users, when the caller read them
        (``MessageIdentify``); otherwise they are read here."""
        self.workspace = workspace
        if read is None:
            user_ids = {row.user_id for row in rows if row.user_id is not None}
            owners = bulk.owners_of(workspace, user_ids)
            pks = {row.user_pk for row in rows if row.user_pk is not None} | set(owners.values())
            emails = {row.changes.email_key for row in rows} - {""}
            read = owners, bulk.lock_users(workspace, pks, emails)
        owners, locked = read
        self.by_pk: dict[int, EndUser] = {user.pk: user for user in locked}
        if any(pk not in self.by_pk for pk in owners.values()):
            raise ConcurrentChange()  # a user deleted since its identity was read
        self.owner: dict[str, EndUser] = {uid: self.by_pk[pk] for uid, pk in owners.items()}
        self.by_email: dict[str, list[EndUser]] = defaultdict(list)
        for user in self.by_pk.values():
            if user.email_key:
                self.by_email[user.email_key].append(user)
        self.merged_into: dict[int, EndUser] = {}  # id(absorbed) -> survivor
        self.created: list[EndUser] = []
        self.identities: list[tuple[EndUser, str]] = []
        self.dirty: dict[int, EndUser] = {}  # existing users to write back, by id()
        self.prepare = False  # a merge's statements prepared (users.merges.absorb)
        self._new_users: _NewUsers | None = None  # made at the first user this batch creates

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

    def create(
        self,
        user_id: str | None,
        changes: ProfileChanges,
        occurred_at: datetime,
        restamp: bool,
        *,
        indexed: bool = True,
        built: EndUser | None = None,
    ) -> EndUser:
        """A new user from ``changes``. ``indexed`` False: for a row that no other row of the
        batch names (``_rows_that_only_create``), so no index of the batch needs the user.
        ``built``: that very user, built ahead from the same arguments (``build_new_users``)."""
        if self._new_users is None:
            self._new_users = _NewUsers(self.workspace)
        if built is not None:
            user = built
            user.created_at = self._new_users.now()  # when the engine creates it, in row order
        else:
            user = self._new_users.build(user_id, changes, occurred_at, restamp)
        self.created.append(user)
        if indexed and user.email_key:
            self.by_email[user.email_key].append(user)
        if user_id:
            if indexed:
                self.owner[user_id] = user
            self.identities.append((user, user_id))
        return user

    def forget(self, absorbed: EndUser, survivor: EndUser) -> None:
        if absorbed.email_key:
            self.by_email[absorbed.email_key].remove(absorbed)
        self.merged_into[id(absorbed)] = survivor
        self.dirty.pop(id(absorbed), None)


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


def _apply_row(
    state: _Batch, row: ProfileRow, occurred_at: datetime, reason: str, actor: str, restamp: bool, seen_by
) -> _InMemoryResult:
    """Kana's identify rules for one row, against the batch's users as earlier rows left them.

    ``restamp`` (see ``apply_changes``): True for Segment messages, False for CSV rows.
    ``seen_by(users)``: the label of an earlier row that touched one of ``users``, if any.
    """
    changes = row.changes

    def update(user: EndUser, ambiguous: bool = False) -> _InMemoryResult:
        first = seen_by([user])
        if first is not None:
            raise _duplicate_row(first)
        old_key = user.email_key
        stamps = [getattr(user, name) for name in SET_AT_FIELDS]
        if apply_changes(user, changes, occurred_at, restamp_unchanged=restamp):
            state.changed(user, old_key)
            return _InMemoryResult(user, IdentifyOutcome.UPDATED, ambiguous)
        if stamps != [getattr(user, name) for name in SET_AT_FIELDS]:
            # Same values, confirmed by a newer message: keep its time, not a profile change.
            state.changed(user, old_key)
        return _InMemoryResult(user, IdentifyOutcome.UNCHANGED, ambiguous)

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
            return _InMemoryResult(state.create(None, changes, occurred_at, restamp), IdentifyOutcome.CREATED)
        return update(matches[0])

    user, plan = _plan_of(state, row)
    if plan.action == "create":
        created = state.create(row.user_id, changes, occurred_at, restamp)
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
        apply_changes(target, changes, occurred_at, restamp_unchanged=restamp)
        state.changed(target, old_key)
        return _InMemoryResult(target, IdentifyOutcome.CLAIMED)
    survivor, absorbed = oldest_first([user, target])
    if survivor.pk is None or absorbed.pk is None:
        raise _CreatedInThisPass()  # only a pass of several messages meets it: see identify_users
    old_key = survivor.email_key
    absorb(
        workspace=state.workspace,
        survivor=survivor,
        absorbed=absorbed,
        reason=reason,
        actor=actor,
        source=row.label,
        prepare=state.prepare,
    )
    state.forget(absorbed, survivor)
    survivor.user_id = row.user_id  # the payload's userId becomes canonical
    apply_changes(survivor, changes, occurred_at, restamp_unchanged=restamp)
    state.changed(survivor, old_key)
    return _InMemoryResult(survivor, IdentifyOutcome.MERGED, absorbed_users=(absorbed,))


def _rows_that_only_create(state: _Batch, rows: list[ProfileRow]) -> list[bool]:
    """Which rows the rules can only create from, decided for the whole batch at once.

    A row only creates when nothing it names exists or is named by another row: no kana_id,
    a userId (if any) that no user of the workspace has and no other row names, an email
    key (if any) that no user has (the batch read every user with the rows' emails) and no
    other row names, and at least one of the two (else it is ``missing_identifier``). For
    such a row ``_apply_row`` finds no U and no C: its plan is "create", never ambiguous,
    and no earlier or later row of the batch can reach its user, so it needs none of the
    batch's indexes nor the duplicate check. Every other row goes through ``_apply_row``.
    """
    user_ids = Counter(row.user_id for row in rows if row.user_id is not None)
    keys = [row.changes.email_key for row in rows]
    key_counts = Counter(keys)
    only: list[bool] = []
    for row, key in zip(rows, keys, strict=True):
        user_id = row.user_id
        only.append(
            row.user_pk is None
            and not row.changes.audiences
            and (user_id is not None or bool(key))
            and (user_id is None or (user_ids[user_id] == 1 and user_id not in state.owner))
            and (not key or (key_counts[key] == 1 and key not in state.by_email))
        )
    return only


def _plan_of(state: _Batch, row: ProfileRow) -> tuple[EndUser | None, _IdentifyPlan]:
    """A userId row's U (its userId's user, if any) and what the rules do with it."""
    user = state.owner_of(row.user_id)
    return user, _plan_identify(user, [u for u in state.with_email(row.changes.email_key) if u is not user])


# Fewer rows than this are written with plain INSERTs and UPDATEs: COPY and the scratch
# table cost more round trips than they save (an identify message writes one user).
_BULK_MIN_ROWS = 8


def _write_back(state: _Batch) -> None:
    """Creations, claims and updates of one batch: a few statements whatever its size."""
    now = timezone.now()
    for user in state.created:
        user.updated_at = now
    if connection.vendor == "postgresql" and len(state.created) >= _BULK_MIN_ROWS:
        bulk.copy_in(state.created)
    else:
        EndUser.objects.bulk_create(state.created, batch_size=1000)
    if connection.vendor == "postgresql" and len(state.identities) >= _BULK_MIN_ROWS:
        bulk.copy_identities(state.workspace, state.identities, now)
    else:
        UserIdentity.objects.bulk_create(
            [
                UserIdentity(workspace=state.workspace, user=u, external_id=uid, created_at=now)
                for u, uid in state.identities
            ],
            batch_size=1000,
        )
    dirty = list(state.dirty.values())
    if len(dirty) >= _BULK_MIN_ROWS:
        for user in dirty:
            user.updated_at = now
        bulk.update_users(dirty)
    else:
        for user in dirty:
            user.save(update_fields=bulk.PROFILE_COLUMNS)  # updated_at: auto_now


# --- Entry points ---------------------------------------------------------------------


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
    """
    row = ProfileRow(changes=changes, user_id=user_id, label=source)
    return apply_profile_row(
        workspace=workspace, row=row, occurred_at=occurred_at, reason=reason, actor=actor, restamp=restamp_unchanged
    )


def identify_users(
    *, workspace: Workspace, identifies: list[tuple[ProfileRow, datetime]], actor: str = "segment"
) -> list[IdentifyResult]:
    """Identify messages in order, in one pass of the engine (a batch's run of identifies).

    The same rules and the same result as ``identify_user`` message after message, in a few
    statements for the whole run: the advisory locks of every userId and email it names
    (sorted, so concurrent runs cannot deadlock), one read of the users, one write back. Runs
    in the caller's transaction. Returns the results of a prefix of the run: it stops before
    a message that would merge a user created earlier in the same pass (that user must be
    written first); the caller applies the rest in another pass.
    """
    rows = [row for row, _ in identifies]
    keys = []
    for row in rows:
        keys.extend(identity_lock_keys(workspace, [row.user_id], row.changes.email_key))
    lock_keys(keys)
    state = _Batch(workspace, rows)
    results = []
    for row, occurred_at in identifies:
        try:
            applied = _apply_row(state, row, occurred_at, MergeReason.IDENTIFY, actor, True, seen_by=lambda users: None)
        except _CreatedInThisPass:
            break
        results.append(applied)
    _write_back(state)
    return [applied.as_result() for applied in results]


class MessageIdentify:
    """One identify message (PostgreSQL), its first round trip (with ``begin``, inside
    ``kana.db.pipelined.transaction``, the one that sends ``BEGIN``) takes its
    advisory locks (userId, email), reads its userId's owner, row-locks its users (that
    owner and the users with its email, in id order) and runs the caller's ``read`` last.

    ``read`` runs after the locks and the users' read, each statement with its own snapshot:
    a deletion that committed before the users were read is visible to it (its suppressions
    commit with it), and one that had not must wait for the row locks. So the caller's
    suppression check there needs no second look after the write.

    Then ``apply`` runs the engine on that state, exactly as ``identify_user`` would. Inside
    ``atomic`` (``begin`` False) the same steps run in Django's transaction; a caller in a
    pipelined one hands it to ``atomic`` before a merge (``merges``,
    ``kana.db.pipelined.atomic``): its receivers may enqueue work on commit, which a
    transaction unknown to Django cannot defer.
    """

    def __init__(self, *, workspace: Workspace, row: ProfileRow, read: kept_cursor.Statement, begin: bool):
        self.row = row
        user_ids = {row.user_id} if row.user_id else set()
        emails = {row.changes.email_key} - {""}
        # Prepared (kana.db.prepared; the caller's ``read`` is its to prepare): parsing and
        # planning the locks and the two reads as text was ≈ 0.8 ms of PostgreSQL CPU per
        # identify, running them prepared ≈ 0.2 ms (docs/performance-history.md, "Round 11: s2cpu").
        # Their texts are a few shapes (a userId or not, an email or not). Each read probes
        # indexes by construction (``bulk.lock_users_sql``), but a generic plan made while
        # the tables were near empty may still tie a worse index: prepared again every
        # prepared.REPLAN_EVERY uses.
        owners, users, self.read_rows = lock_keys_and_read(
            identity_lock_keys(workspace, sorted(user_ids), row.changes.email_key),
            [
                _prepared(bulk.owners_of_sql(workspace, user_ids)),
                _prepared(bulk.lock_users_sql(workspace, set(), emails, owners_of=user_ids)),
                read,
            ],
            begin=begin,
            prepare=True,
        )
        self.state = _Batch(workspace, [row], read=(dict(owners), bulk.users_from_rows(users)))
        self.state.prepare = True  # its merge's statements too: the caller re-runs when one is missing

    def merges(self) -> bool:
        return self.row.user_id is not None and _plan_of(self.state, self.row)[1].action == "merge"

    def apply(
        self, *, occurred_at: datetime, reason: str = MergeReason.IDENTIFY, actor: str = "segment"
    ) -> IdentifyResult:
        result = _apply_row(self.state, self.row, occurred_at, reason, actor, True, seen_by=lambda users: None)
        _write_back_in_one_round_trip(self.state)
        return result.as_result()


def _prepared(statement: tuple[str, list]) -> kept_cursor.Statement:
    sql, params = statement
    return kept_cursor.Statement(sql, params, prepare=True, replan_every=prepared.REPLAN_EVERY)


def _placeholder(column: str) -> str:
    return "%s::jsonb" if column == "audiences" else "%s"


def _value(user: EndUser, column: str):
    return json.dumps(user.audiences) if column == "audiences" else getattr(user, column)


_INSERTED_COLUMNS = [f.attname for f in EndUser._meta.concrete_fields if not f.primary_key]
_INSERT_USER_SQL = (
    f"INSERT INTO {EndUser._meta.db_table} ({', '.join(_INSERTED_COLUMNS)}) "
    f"VALUES ({', '.join(_placeholder(c) for c in _INSERTED_COLUMNS)}) RETURNING id"
)
# The new user and its userId in one statement.
_INSERT_USER_WITH_IDENTITY_SQL = (
    f"WITH new_user AS ({_INSERT_USER_SQL}) INSERT INTO {UserIdentity._meta.db_table} "
    "(workspace_id, user_id, external_id, created_at) SELECT %s, id, %s, %s FROM new_user RETURNING user_id"
)
_INSERT_IDENTITY_SQL = (
    f"INSERT INTO {UserIdentity._meta.db_table} (workspace_id, user_id, external_id, created_at) "
    "VALUES (%s, %s, %s, %s)"
)
_UPDATE_PROFILE_SQL = (
    f"UPDATE {EndUser._meta.db_table} SET {', '.join(f'{c} = {_placeholder(c)}' for c in bulk.PROFILE_COLUMNS)} "
    "WHERE id = %s"
)

# The write back's statements: the only ones it sends, each prepared once per connection.
WRITE_BACK_STATEMENTS = (_INSERT_USER_SQL, _INSERT_USER_WITH_IDENTITY_SQL, _INSERT_IDENTITY_SQL, _UPDATE_PROFILE_SQL)


def _write_back_in_one_round_trip(state: _Batch) -> None:
    """``_write_back`` for one message (PostgreSQL): its new user with its userId in one
    statement, the identities and profile columns of the users it changed in others, all in
    one message. No ``atomic`` inside (``bulk_create`` opens one): the caller's transaction
    is not Django's (``MessageIdentify``). A unique violation is Django's IntegrityError."""
    now = timezone.now()
    statements: list[tuple[str, list]] = []
    if len(state.created) > 1:
        raise ValueError("one message creates one user at most")
    for user in state.created:
        user.updated_at = now
        values = [_value(user, c) for c in _INSERTED_COLUMNS]
        user_id = next((uid for u, uid in state.identities if u is user), None)
        if user_id is None:
            statements.append((_INSERT_USER_SQL, values))
        else:
            statements.append((_INSERT_USER_WITH_IDENTITY_SQL, [*values, state.workspace.pk, user_id, now]))
    statements += [
        (_INSERT_IDENTITY_SQL, [state.workspace.pk, user.pk, uid, now])
        for user, uid in state.identities
        if user.pk is not None
    ]
    for user in state.dirty.values():
        user.updated_at = now
        statements.append((_UPDATE_PROFILE_SQL, [*(_value(user, c) for c in bulk.PROFILE_COLUMNS), user.pk]))
    if not statements:
        return
    # Prepared once per connection (kana.db.prepared): their texts are the four constants above
    # and their generic plans have no choice to make (inserts, an update by primary key). Their
    # values bound server-side in a pipeline (kana.db.kept_cursor.message_results), not formatted
    # into EXECUTE texts: docs/performance-history.md, "Round 15: s2app".
    results = kept_cursor.message_results(
        [kept_cursor.Statement(sql, params, prepare=True) for sql, params in statements]
    )
    for user in state.created:
        ((user.pk,),) = results[0]
        user._state.adding = False


def upsert_user_by_email(*, workspace: Workspace, changes: ProfileChanges, occurred_at: datetime) -> IdentifyResult:
    """A row with an email and no userId: update the one user with it, or create a bare one.

    Several users with the email is an error: the row must name the user by its kana_id.
    """
    if not changes.email_key:
        raise _missing_identifier()
    return apply_profile_row(workspace=workspace, row=ProfileRow(changes=changes), occurred_at=occurred_at)


def update_user(
    *,
    workspace: Workspace,
    user_pk: int,
    changes: ProfileChanges,
    occurred_at: datetime | None = None,
    actor: str = "",
) -> IdentifyResult:
    """Set fields of one user named by its Kana id (an admin's edit: REST or dashboard).

    Recorded in the audit log (``user.update``) in the same transaction.
    """
    row = ProfileRow(changes=changes, user_pk=user_pk)
    occurred_at = occurred_at or timezone.now()
    fields = [name for name in ("name", "email", "billing_id") if getattr(changes, name) is not UNSET]
    if "billing_id" in fields:
        fields.append("billing_provider")

    def once() -> IdentifyResult:
        with transaction.atomic():
            lock_keys(identity_lock_keys(workspace, [], changes.email_key))
            before = EndUser.objects.for_workspace(workspace).filter(pk=user_pk).values(*fields).first()
            result = _apply_one_row(workspace, row, occurred_at, MergeReason.CSV, actor, restamp=False)
            after = {name: getattr(result.user, name) for name in fields}
            if result.absorbed_ids:
                after["absorbed_ids"] = result.absorbed_ids
            audit.record(workspace, actor, "user.update", result.user.pk, before=before, after=after)
            return result

    return run_with_retries(once)


def _apply_one_row(
    workspace: Workspace, row: ProfileRow, occurred_at: datetime, reason: str, actor: str, restamp: bool
) -> IdentifyResult:
    """``apply_profile_row``'s work, in the caller's transaction, under its advisory locks."""
    state = _Batch(workspace, [row])
    result = _apply_row(state, row, occurred_at, reason, actor, restamp, seen_by=lambda users: None)
    _write_back(state)
    return result.as_result()


def apply_profile_row(
    *,
    workspace: Workspace,
    row: ProfileRow,
    occurred_at: datetime,
    reason: str = MergeReason.CSV,
    actor: str = "",
    restamp: bool = False,
) -> IdentifyResult:
    """One row in a transaction of its own, with the advisory locks of a message."""

    def once() -> IdentifyResult:
        with transaction.atomic():
            lock_keys(identity_lock_keys(workspace, [row.user_id] if row.user_id else [], row.changes.email_key))
            return _apply_one_row(workspace, row, occurred_at, reason, actor, restamp)

    return run_with_retries(once)


def apply_profile_rows(
    *,
    workspace: Workspace,
    rows: list[ProfileRow],
    occurred_at: datetime,
    touched: "dict[int, str] | TouchedUsers",
    reason: str = MergeReason.CSV,
    actor: str = "",
    one_at_a_time: bool = False,
    new_users: list["EndUser | None"] | None = None,
) -> list[RowOutcome]:
    """A batch of rows in one pass of the engine: a few queries per call, whatever its size.
    Runs in a savepoint, retried as a whole.

    ``one_at_a_time``: each row in a savepoint of its own, with a message's advisory locks:
    the reference the one-pass path is tested against (same outcomes). Either way a row
    naming a user that an earlier row (``touched``: user pk -> row label, kept by the caller
    across calls) already changed, claimed, merged or left unchanged is a ``duplicate_row``
    error and leaves no trace.
    It takes no advisory locks (see the module's docstring): what is lost is only that an
    identify naming an email this call is setting at the same moment may not see it,
    leaving two users flagged ``same_email`` instead of merged.

    ``new_users``: ``build_new_users(rows=rows, occurred_at=occurred_at)``, built ahead by the
    caller; the first pass takes a row's user from it when the row only creates (a retried pass
    builds its own). Same outcomes and users either way.
    """
    if one_at_a_time:
        return _apply_rows_singly(workspace, rows, occurred_at, touched, reason, actor)
    ahead = [new_users]

    def once():
        # The users built ahead serve the first pass only: a pass that failed gave them ids.
        built, ahead[0] = ahead[0], None
        return _apply_rows_once(workspace, rows, occurred_at, touched, reason, actor, built)

    outcomes, newly_touched, created = run_with_retries(once)
    _remember(touched, newly_touched, created=created)
    return outcomes


def _apply_rows_singly(workspace, rows, occurred_at, touched, reason, actor) -> list[RowOutcome]:
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


def _apply_rows_once(workspace, rows, occurred_at, touched, reason, actor, new_users=None):
    with transaction.atomic():
        state = _Batch(workspace, rows)
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

        only_creates = _rows_that_only_create(state, rows)
        built = new_users if new_users is not None else [None] * len(rows)
        for row, only_create, new_user in zip(rows, only_creates, built, strict=True):
            if only_create:
                user = state.create(row.user_id, row.changes, occurred_at, False, indexed=False, built=new_user)
                planned.append((row, IdentifyResult(user=user, outcome=IdentifyOutcome.CREATED)))
                continue
            try:
                result = _apply_row(state, row, occurred_at, reason, actor, False, seen_by)
            except IdentityError as error:
                planned.append((row, error))
                continue
            for user in (result.user, *result.absorbed_users):
                touched_here[id(user)] = row.label
            planned.append((row, result.as_result()))

        _write_back(state)
        # The users this batch created are kept apart: their ids are new (TouchedUsers.update).
        newly_touched: dict[int, str] = {}
        created: dict[int, str] = {}
        outcomes: list[RowOutcome] = []
        for row, outcome in planned:
            if isinstance(outcome, IdentifyResult):
                if outcome.outcome == IdentifyOutcome.CREATED:
                    created[outcome.user.pk] = row.label
                else:
                    newly_touched.update((pk, row.label) for pk in _touched_by(outcome))
            outcomes.append(outcome)
        return outcomes, newly_touched, created


# --- Track: resolving userIds in bulk --------------------------------------------------


def resolve_users(
    *, workspace: Workspace, external_ids: Iterable[str], known: dict[str, int] | None = None
) -> dict[str, int]:
    """Map each userId to its user's id, creating a user (with only that id) for unknown ones.

    One query when every id is known, two otherwise (one fewer with ``known``: what the
    caller read for them in its transaction, ``features.ledger.KnownIds.users``). Must run inside the caller's
    transaction. On PostgreSQL a userId created concurrently by another transaction is not
    an error: the insert skips it (``ON CONFLICT DO NOTHING`` waits for that transaction)
    and it is read back. Only an alias racing with the creation (the userId became another
    user's identity meanwhile) makes the caller's transaction run again.
    """
    wanted = set(external_ids)
    if not wanted:
        return {}
    if known is None:
        resolved = dict(
            UserIdentity.objects.for_workspace(workspace)
            .filter(external_id__in=wanted)
            .values_list("external_id", "user_id")
        )
    else:  # the caller read these userIds' identities in this transaction already
        resolved = {uid: pk for uid, pk in known.items() if uid in wanted}
    missing = sorted(wanted - resolved.keys())  # sorted: concurrent creators wait in one order
    if not missing:
        return resolved
    now = timezone.now()
    if connection.vendor != "postgresql":  # SQLite serialises writers: nobody can race us
        created = EndUser.objects.bulk_create(
            [EndUser(workspace=workspace, user_id=uid, created_at=now) for uid in missing]
        )
        UserIdentity.objects.bulk_create(
            [UserIdentity(workspace=workspace, user=u, external_id=u.user_id, created_at=now) for u in created]
        )
        resolved.update((u.user_id, u.pk) for u in created)
        return resolved
    with connection.cursor() as cursor:
        cursor.execute(_CREATE_BARE_IDENTITIES_SQL, {"ws": workspace.pk, "now": now, "user_ids": missing})
        rows = cursor.fetchall()
    if not all(has_identity for _, _, has_identity in rows):
        raise ConcurrentChange()  # an alias claimed one of these userIds meanwhile
    if rows and suppressed_user_ids(workspace=workspace, user_ids={user_id for user_id, _, _ in rows}):
        # The user of one of these userIds was deleted (and the userId suppressed) after the
        # caller checked: the insert waited for that deletion, this statement sees it. Run
        # again: the caller's check now answers ``suppressed``.
        raise ConcurrentChange()
    resolved.update((user_id, pk) for user_id, pk, _ in rows)
    created_elsewhere = [uid for uid in missing if uid not in resolved]
    if created_elsewhere:
        resolved.update(
            UserIdentity.objects.for_workspace(workspace)
            .filter(external_id__in=created_elsewhere)
            .values_list("external_id", "user_id")
        )
        if any(uid not in resolved for uid in created_elsewhere):
            raise ConcurrentChange()
    return resolved


_CREATE_BARE_IDENTITIES_SQL = f"""
WITH new_users AS (
    INSERT INTO {EndUser._meta.db_table}
        (workspace_id, user_id, name, email, email_key, billing_id, billing_provider, audiences, created_at, updated_at)
    SELECT %(ws)s, uid, '', '', '', '', '', '{{}}'::jsonb, %(now)s, %(now)s
    FROM unnest(%(user_ids)s::text[]) AS uid
    ORDER BY uid
    ON CONFLICT (workspace_id, user_id) WHERE user_id IS NOT NULL DO NOTHING
    RETURNING id, user_id
), new_identities AS (
    INSERT INTO {UserIdentity._meta.db_table} (workspace_id, user_id, external_id, created_at)
    SELECT %(ws)s, id, user_id, %(now)s FROM new_users
    ON CONFLICT (workspace_id, external_id) DO NOTHING
    RETURNING external_id
)
SELECT n.user_id, n.id, i.external_id IS NOT NULL
FROM new_users n LEFT JOIN new_identities i ON i.external_id = n.user_id
"""


# --- Alias -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasCall:
    """A Segment alias: ``previous_id`` becomes another userId of ``user_id``'s user."""

    previous_id: str
    user_id: str
    source: str = ""  # the ledger's source when the alias merges two users


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
    call = AliasCall(previous_id, user_id, source)

    def once() -> IdentifyResult:
        with transaction.atomic():
            return alias_users(workspace=workspace, calls=[call], actor=actor)[0]

    return run_with_retries(once)


def alias_users(*, workspace: Workspace, calls: list[AliasCall], actor: str = "segment") -> list[IdentifyResult]:
    """Alias calls in order, in the caller's transaction: the advisory locks of every userId
    they name (sorted: concurrent runs cannot deadlock), one read of who owns those userIds,
    one row lock of those users in id order, then each call against that state."""
    for call in calls:
        if call.previous_id == call.user_id:
            raise IdentityError("invalid_alias", "previousId and userId are the same", "previousId")
    user_ids = {uid for call in calls for uid in (call.previous_id, call.user_id)}
    lock_keys(identity_lock_keys(workspace, sorted(user_ids)))
    owners = bulk.owners_of(workspace, user_ids)  # userId -> user pk, kept current below
    locked = {user.pk: user for user in bulk.lock_users(workspace, set(owners.values()), set())}
    if any(pk not in locked for pk in owners.values()):
        raise ConcurrentChange()  # a user deleted since its identity was read
    return [_alias(workspace, call, actor, owners, locked) for call in calls]


def _alias(
    workspace: Workspace, call: AliasCall, actor: str, owners: dict[str, int], users: dict[int, EndUser]
) -> IdentifyResult:
    previous_id, user_id = call.previous_id, call.user_id
    previous_owner, owner = owners.get(previous_id), owners.get(user_id)
    if previous_owner is None and owner is None:
        user = EndUser.objects.create(workspace=workspace, user_id=user_id)
        UserIdentity.objects.bulk_create(
            [UserIdentity(workspace=workspace, user=user, external_id=uid) for uid in (user_id, previous_id)]
        )
        owners[user_id] = owners[previous_id] = user.pk
        users[user.pk] = user
        return IdentifyResult(user=user, outcome=IdentifyOutcome.CREATED)
    if previous_owner == owner:
        return IdentifyResult(user=users[owner], outcome=IdentifyOutcome.UNCHANGED)
    if owner is None:
        user = users[previous_owner]
        UserIdentity.objects.create(workspace=workspace, user=user, external_id=user_id)
        owners[user_id] = user.pk
        user.user_id = user_id
        user.save()
        return IdentifyResult(user=user, outcome=IdentifyOutcome.UPDATED)
    if previous_owner is None:
        user = users[owner]
        UserIdentity.objects.create(workspace=workspace, user=user, external_id=previous_id)
        owners[previous_id] = user.pk
        return IdentifyResult(user=user, outcome=IdentifyOutcome.UPDATED)
    survivor, absorbed = oldest_first([users[previous_owner], users[owner]])
    reason = MergeReason.ALIAS
    absorb(workspace=workspace, survivor=survivor, absorbed=absorbed, reason=reason, actor=actor, source=call.source)
    for uid, pk in owners.items():  # the absorbed user's userIds now resolve to the survivor
        if pk == absorbed.pk:
            owners[uid] = survivor.pk
    del users[absorbed.pk]
    survivor.user_id = user_id
    survivor.save()
    return IdentifyResult(user=survivor, outcome=IdentifyOutcome.MERGED, absorbed_ids=[absorbed.pk])


def suppressed_user_ids(*, workspace: Workspace, user_ids: set[str]) -> set[str]:
    """Which of these userIds belong to deleted users (one indexed lookup, two for many
    userIds in a workspace with more suppressions than that)."""
    if not user_ids:
        return set()
    if connection.vendor == "postgresql" and len(user_ids) > _SUPPRESSED_ARRAY_MIN:
        table = connection.ops.quote_name(Suppression._meta.db_table)
        with connection.cursor() as cursor:
            # A CSV chunk's 1,000 userIds against a workspace's suppressions, which are
            # usually few or none: when there are no more of them than userIds asked, they
            # are read whole and matched here (≈ 0.1 ms), instead of the userIds sent as an
            # array, parsed and probed one by one (≈ 1 ms a chunk; docs/performance-history.md,
            # "Round 17"). The same committed rows either way, read by one statement.
            cursor.execute(
                f"SELECT user_id FROM {table} WHERE workspace_id = %s ORDER BY user_id LIMIT %s",
                [workspace.pk, len(user_ids) + 1],
            )
            suppressed = cursor.fetchall()
            if len(suppressed) <= len(user_ids):
                return {user_id for (user_id,) in suppressed} & user_ids
            # One array parameter: as an IN list of placeholders the statement cost 10-30 ms
            # to send (psycopg's parsing), 0.7 ms as an array.
            cursor.execute(
                f"SELECT user_id FROM {table} WHERE workspace_id = %s AND user_id = ANY(%s::text[])",
                [workspace.pk, bulk.text_array(user_ids)],
            )
            return {user_id for (user_id,) in cursor.fetchall()}
    return set(
        Suppression.objects.for_workspace(workspace).filter(user_id__in=user_ids).values_list("user_id", flat=True)
    )


# Above this many userIds ``suppressed_user_ids`` sends one array (PostgreSQL); a message's
# few ids keep the ORM's statement.
_SUPPRESSED_ARRAY_MIN = 100
