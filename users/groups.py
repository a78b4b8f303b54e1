"""Segment groups (accounts) and who belongs to them."""

from dataclasses import dataclass
from datetime import datetime

from kana.models import Workspace

from .models import Group, GroupMembership


@dataclass(frozen=True)
class GroupCall:
    """One Segment group call: this user belongs to this group, whose traits are these."""

    user_pk: int
    group_id: str
    traits: dict
    occurred_at: datetime


def record_groups(*, workspace: Workspace, calls: list[GroupCall]) -> None:
    """Group calls in order, set-based: a few statements whatever their number.

    The same result as applying them one at a time: a group is created by its first call
    (with that call's traits), later calls replace its traits when they carry some and are
    at least as new; every (group, user) pair becomes one membership, joined at its first
    call. Runs in the caller's transaction; a group created concurrently raises
    IntegrityError, which the caller's retry handles.
    """
    if not calls:
        return
    group_ids = sorted({call.group_id for call in calls})
    groups = {
        g.group_id: g
        for g in Group.objects.for_workspace(workspace)
        .filter(group_id__in=group_ids)
        .order_by("pk")
        .select_for_update()
    }
    created, changed = {}, {}
    for call in calls:
        group = groups.get(call.group_id)
        if group is None:
            group = Group(
                workspace=workspace, group_id=call.group_id, traits=call.traits, traits_set_at=call.occurred_at
            )
            groups[call.group_id] = created[call.group_id] = group
        elif call.traits and (group.traits_set_at is None or call.occurred_at >= group.traits_set_at):
            group.traits, group.traits_set_at = call.traits, call.occurred_at
            if call.group_id not in created:
                changed[call.group_id] = group
    Group.objects.bulk_create(created.values())
    if changed:
        Group.objects.bulk_update(changed.values(), ["traits", "traits_set_at"])
    joined: dict[tuple[int, int], datetime] = {}
    for call in calls:
        joined.setdefault((groups[call.group_id].pk, call.user_pk), call.occurred_at)
    GroupMembership.objects.bulk_create(
        [
            GroupMembership(workspace=workspace, group_id=group_pk, user_id=user_pk, joined_at=at)
            for (group_pk, user_pk), at in joined.items()
        ],
        ignore_conflicts=True,  # already a member: the first joining time stays
    )
