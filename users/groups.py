"""Segment groups (accounts) and who belongs to them."""

from datetime import datetime

from kana.models import Workspace

from .models import Group, GroupMembership


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
