"""Merging users: the one step every merge takes (``absorb``), and admin merges.

A merge keeps one user (the survivor) and absorbs the others: their userIds, profile
values (newest wins, ``users.profile``), group memberships and, through the
``user_absorbed`` signal, their events and usage (``features`` owns those). Every absorbed
user leaves one ledger row (``MergeRecord``, unique per absorbed user, so a replayed merge
is a no-op) with a snapshot of what it was.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import connection, transaction
from django.db.models import Exists, OuterRef

from kana import audit
from kana.db import kept_cursor, pipelined, prepared
from kana.models import Workspace
from kana.retries import ConcurrentChange, run_with_retries

from .conflicts import Conflict, merge_conflicts
from .errors import IdentityError
from .models import EndUser, GroupMembership, MergeReason, MergeRecord, UserIdentity
from .profile import CHOOSABLE_FIELDS, FIELD_CHOICES, absorb_profile, oldest_first, profile_state, snapshot
from .signals import user_absorbed

# Merges nobody reviewed before they happened: a billing id they drop is flagged.
_AUTOMATIC = (MergeReason.IDENTIFY, MergeReason.ALIAS, MergeReason.CSV)


def absorb(
    *,
    workspace: Workspace,
    survivor: EndUser,
    absorbed: EndUser,
    reason: str,
    actor: str,
    source: str,
    choices: dict[str, str] | None = None,
    prepare: bool = False,
) -> None:
    """Move everything of ``absorbed`` to ``survivor``, record it, delete ``absorbed``.

    The caller holds row locks on both users and saves the survivor afterwards.
    ``choices``: an admin's per-field choice (``users.profile.absorb_profile``).
    ``prepare`` (PostgreSQL): the merge's statements, the other layers' included, are
    prepared ones (``kana.db.prepared``), for a caller that re-runs its transaction once when
    ``prepared.is_missing`` its error (one identify per request). Parsing and planning them as
    text was ≈ 2.1-2.5 ms of PostgreSQL CPU per merge, running them prepared ≈ 0.6-0.7 ms
    (docs/performance-history.md, "Round 11: s2cpu"); each one's text is a constant.
    """
    # Their PREPAREs, on a connection's first merge, go in round trips of their own.
    run = _prepared_message if prepare else _text_message
    absorbed_ids, groups = _absorbed_user_ids_and_groups(survivor.pk, absorbed.pk, run)
    before = copy.copy(survivor)
    absorb_profile(survivor, absorbed, choices)
    conflicts = merge_conflicts(before, [absorbed], survivor)
    # What an unmerge gives back: the memberships, and the survivor's own profile.
    absorbed_snapshot = snapshot(absorbed, absorbed_ids)
    absorbed_snapshot["groups"] = [
        {"group": group_pk, "joined_at": joined_at.isoformat(), "shared": shared}
        for group_pk, joined_at, shared in groups
    ]
    absorbed_snapshot["survivor_before"] = profile_state(before)
    record = MergeRecord(
        workspace=workspace,
        survivor=survivor,
        survivor_key=survivor.pk,
        merged_into=survivor.pk,
        absorbed_id=absorbed.pk,
        absorbed_snapshot=absorbed_snapshot,
        reason=reason,
        actor=actor,
        source=source[:255],
        conflicts=[c.as_dict() for c in conflicts],
        billing_conflict=reason in _AUTOMATIC and any(c.field == "billing_id" for c in conflicts),
    )
    # Events, usage, subscriptions: their owners say how to move them, and their statements
    # travel in one message after the ledger row (a receiver may read it: the webhooks') and
    # before the merge's own moves and the absorbed row's deletion.
    responses = user_absorbed.send(EndUser, workspace_id=workspace.pk, absorbed_pk=absorbed.pk, survivor_pk=survivor.pk)
    steps = [step for _receiver, response in responses for step in response or ()]
    moved = {"survivor": survivor.pk, "absorbed": absorbed.pk}
    own = [(sql, [moved[name] for name in names]) for sql, names in _MOVE_AND_DELETE]
    statements = [_insert(record), *((step.sql, step.params) for step in steps), *own]
    results = run(statements)
    for step, rows in zip(steps, results[1:], strict=False):  # the ledger row's, the steps', the merge's own
        if step.then is not None:
            step.then(rows)


_RECORD_FIELDS = [f for f in MergeRecord._meta.concrete_fields if not f.primary_key]
_INSERT_RECORD_SQL = (
    f"INSERT INTO {MergeRecord._meta.db_table} ({', '.join(f.column for f in _RECORD_FIELDS)}) "
    f"VALUES ({', '.join(['%s'] * len(_RECORD_FIELDS))})"
)


def _insert(record: MergeRecord) -> tuple[str, list]:
    """The ledger row's INSERT as a statement of the merge's message: its values prepared for
    the database by each field, as the ORM's insert does (JSON, timestamps)."""
    return _INSERT_RECORD_SQL, [f.get_db_prep_save(f.pre_save(record, True), connection) for f in _RECORD_FIELDS]


_IDENTITIES = UserIdentity._meta.db_table
_MEMBERSHIPS = GroupMembership._meta.db_table
_LEDGER = MergeRecord._meta.db_table

# The rest of a merge in one round trip, set-based: the userIds and memberships move (a group
# both were in keeps the survivor's), merges into the absorbed user now lead to the survivor,
# and the absorbed user's row goes. Deleting it frees its canonical userId for the survivor,
# which the caller saves next. A plain DELETE, not the ORM's collector (eight statements):
# every row that referred to the user was moved above or by the ``user_absorbed`` receivers,
# and a reference something forgot to move fails the merge at commit (the foreign keys are
# checked then) instead of being deleted with the user.
_MOVE_AND_DELETE = [  # each statement, and the names of its positional parameters
    (f"UPDATE {_IDENTITIES} SET user_id = %s WHERE user_id = %s", ("survivor", "absorbed")),
    (
        f"DELETE FROM {_MEMBERSHIPS} WHERE user_id = %s "
        f"AND group_id IN (SELECT group_id FROM {_MEMBERSHIPS} WHERE user_id = %s)",
        ("absorbed", "survivor"),
    ),
    (f"UPDATE {_MEMBERSHIPS} SET user_id = %s WHERE user_id = %s", ("survivor", "absorbed")),
    (
        f"UPDATE {_LEDGER} SET survivor_id = %s, survivor_key = %s WHERE survivor_id = %s",
        ("survivor", "survivor", "absorbed"),
    ),
    (f"DELETE FROM {EndUser._meta.db_table} WHERE id = %s", ("absorbed",)),
]


def _text_message(statements: list[tuple[str, list]]) -> list[list[tuple]]:
    return pipelined.execute_all(statements)


def _prepared_message(statements: list[tuple[str, list]]) -> list[list[tuple]]:
    """The statements prepared (again every ``prepared.REPLAN_EVERY`` uses), sent in one
    pipeline with their values bound server-side (``kana.db.kept_cursor.message_results``):
    formatting them into ``EXECUTE`` texts was the largest part of a merge's app CPU after
    its statements were prepared (docs/performance-history.md, "Round 15: s2app")."""
    return kept_cursor.message_results(
        [
            kept_cursor.Statement(sql, params, prepare=True, replan_every=prepared.REPLAN_EVERY)
            for sql, params in statements
        ]
    )


def _absorbed_user_ids_and_groups(
    survivor_pk: int, absorbed_pk: int, run: Callable[[list[tuple[str, list]]], list[list[tuple]]] = _text_message
) -> tuple[list[str], list[tuple]]:
    """The absorbed user's userIds (oldest first), and its memberships (group id, joined at,
    whether the survivor is in that group too), in one round trip on PostgreSQL."""
    if connection.vendor != "postgresql":  # SQLite's driver gives raw timestamps as text: the ORM parses them
        user_ids = UserIdentity.objects.filter(user_id=absorbed_pk).order_by("created_at", "pk")
        survivor_groups = GroupMembership.objects.filter(user_id=survivor_pk).values("group_id")
        groups = (
            GroupMembership.objects.filter(user_id=absorbed_pk)
            .annotate(shared=Exists(survivor_groups.filter(group_id=OuterRef("group_id"))))
            .order_by("group_id")
            .values_list("group_id", "joined_at", "shared")
        )
        return list(user_ids.values_list("external_id", flat=True)), list(groups)
    identities, groups = run(
        [
            (f"SELECT external_id FROM {_IDENTITIES} WHERE user_id = %s ORDER BY created_at, id", [absorbed_pk]),
            (
                f"SELECT m.group_id, m.joined_at, EXISTS (SELECT 1 FROM {_MEMBERSHIPS} s "
                "WHERE s.user_id = %s AND s.group_id = m.group_id) "
                f"FROM {_MEMBERSHIPS} m WHERE m.user_id = %s ORDER BY m.group_id",
                [survivor_pk, absorbed_pk],
            ),
        ]
    )
    return [external_id for (external_id,) in identities], groups


@dataclass
class MergeResult:
    survivor: EndUser
    absorbed_ids: list[int]
    # True when every named user had already been merged into the survivor: nothing changed.
    already_merged: bool = False
    # The fields the merged users held different values of, and what the survivor kept.
    conflicts: list[Conflict] = field(default_factory=list)


def check_field_choices(fields: dict[str, str] | None) -> dict[str, str]:
    """An admin's per-field choice, checked: ``{field: "survivor"|"absorbed"|"newest"}``."""
    for name, choice in (fields or {}).items():
        if name not in CHOOSABLE_FIELDS:
            raise IdentityError(
                "invalid_field", f"{name!r} cannot be chosen: only {', '.join(CHOOSABLE_FIELDS)}", "fields"
            )
        if choice not in FIELD_CHOICES:
            raise IdentityError("invalid_choice", f"{choice!r} is not one of {', '.join(FIELD_CHOICES)}", "fields")
    return dict(fields or {})


def merge_users(
    *,
    workspace: Workspace,
    user_pks: list[int],
    survivor_pk: int | None = None,
    reason: str = MergeReason.ADMIN,
    actor: str = "",
    source: str = "",
    fields: dict[str, str] | None = None,
) -> MergeResult:
    """Merge users (by Kana id) into one: the oldest, or ``survivor_pk`` when given.

    ``fields``: per field (name, email, billing_id) whose value to keep: ``survivor``,
    ``absorbed`` or ``newest`` (the default, SPEC §4). The result lists the conflicts.
    Idempotent: ids already absorbed are followed through the ledger to their survivor, so
    repeating a merge request finds one user and changes nothing.
    """
    choices = check_field_choices(fields)
    wanted = list(dict.fromkeys(int(pk) for pk in user_pks))
    if survivor_pk is not None and int(survivor_pk) not in wanted:
        wanted.append(int(survivor_pk))
    if len(wanted) < 2:
        raise IdentityError("too_few_users", "name at least two users to merge", "user_ids")

    @transaction.atomic
    def once() -> MergeResult:
        current = {pk: current_user_pk(workspace, pk) for pk in wanted}
        unknown = [pk for pk, now in current.items() if now is None]
        if unknown:
            raise IdentityError(
                "unknown_user", f"no user with id {unknown[0]} in this workspace", "user_ids", status=404
            )
        targets = sorted(set(current.values()))
        users = list(EndUser.objects.for_workspace(workspace).filter(pk__in=targets).order_by("pk").select_for_update())
        if len(users) != len(targets):
            raise ConcurrentChange()
        chosen = current[int(survivor_pk)] if survivor_pk is not None else None
        survivor = next(u for u in users if u.pk == chosen) if chosen else oldest_first(users)[0]
        if len(users) == 1:
            return MergeResult(survivor=survivor, absorbed_ids=[], already_merged=True)
        before = copy.copy(survivor)
        absorbed = [user for user in oldest_first(users) if user.pk != survivor.pk]
        for user in absorbed:
            absorb(
                workspace=workspace,
                survivor=survivor,
                absorbed=user,
                reason=reason,
                actor=actor,
                source=source,
                choices=choices,
            )
        survivor.save()
        conflicts = merge_conflicts(before, absorbed, survivor)
        absorbed_ids = [u.pk for u in absorbed]
        summary_before = {"user_ids": sorted(u.pk for u in users)}
        after = {"survivor": survivor.pk, "absorbed_ids": absorbed_ids, "reason": reason}
        audit.record(workspace, actor, "merge", survivor.pk, before=summary_before, after=after)
        return MergeResult(survivor=survivor, absorbed_ids=absorbed_ids, conflicts=conflicts)

    return run_with_retries(once)


def current_user_pk(workspace: Workspace, user_pk: int) -> int | None:
    """The id a user has now: itself, or the survivor it was merged into (followed)."""
    return follow_merges(workspace, user_pk)


def follow_merges(workspace: Workspace, user_pk: int, *, via: str = "survivor_key", found=frozenset()) -> int | None:
    """Follow standing ledger rows from ``user_pk`` to an existing user (or one in ``found``).

    ``via``: the ledger column to follow: ``survivor_key`` (where the absorbed user's things
    are now) or ``merged_into`` (the survivor at the time of that merge). None: a dead end.
    """
    seen = set()
    while user_pk not in seen:
        seen.add(user_pk)
        if user_pk in found or EndUser.objects.for_workspace(workspace).filter(pk=user_pk).exists():
            return user_pk
        parent = (
            MergeRecord.objects.for_workspace(workspace)
            .filter(absorbed_id=user_pk, undone_at__isnull=True)
            .values_list(via, flat=True)
            .first()
        )
        if parent is None:
            return None
        user_pk = parent
    return None
