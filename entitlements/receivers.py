"""What entitlements does when users change below it (connected in ``EntitlementsConfig.ready``)."""

from django.db import connection
from django.dispatch import receiver
from django.utils import timezone

from kana.db import pipelined
from users.signals import user_absorbed, user_deleting, user_restored

from .models import Reservation, Subscription, SubscriptionMove
from .services import subject_key


@receiver(user_absorbed, dispatch_uid="entitlements.follow_absorbed_user")
def follow_absorbed_user(
    sender, *, workspace_id: int, absorbed_pk: int, survivor_pk: int, **kwargs
) -> list[pipelined.Step]:
    """A merged user's subscriptions and holds go to the survivor, in the merge's transaction
    (the absorbed user's row is deleted next, which would otherwise delete them). Each moved
    subscription is noted, so that undoing the merge hands it back.

    As statements the merge sends in its own message (``users.signals.user_absorbed``): the
    notes are taken from the subscriptions before they move (the statements run in order).

    The user's rows are found by the user's own index, the workspace checked, not probed
    (``workspace_id + 0``), and the holds by subject with the workspace hidden from the planner
    (a sub-select): given a workspace newer than the statistics, the planner puts its rows at
    one, and the workspace-only index ties with the right one and wins, each merge then reading
    every subscription or hold of the workspace (docs/performance-history.md, "Round 15: s2ties")."""
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    absorbed_subject, survivor_subject = subject_key(user_pk=absorbed_pk), subject_key(user_pk=survivor_pk)
    return [
        pipelined.Step(
            f"INSERT INTO {_MOVES} (workspace_id, subscription_id, from_user_key, to_user_key, created_at) "
            f"SELECT workspace_id, id, %s, %s, %s FROM {_SUBSCRIPTIONS} "
            "WHERE user_id = %s AND workspace_id + 0 = %s ORDER BY id",
            [absorbed_pk, survivor_pk, now, absorbed_pk, workspace_id],
        ),
        pipelined.Step(
            f"UPDATE {_SUBSCRIPTIONS} SET user_id = %s, updated_at = %s WHERE user_id = %s AND workspace_id + 0 = %s",
            [survivor_pk, now, absorbed_pk, workspace_id],
        ),
        pipelined.Step(
            f"UPDATE {_RESERVATIONS} SET user_id = %s WHERE user_id = %s AND workspace_id + 0 = %s",
            [survivor_pk, absorbed_pk, workspace_id],
        ),
        pipelined.Step(
            f"UPDATE {_RESERVATIONS} SET subject = %s "
            "WHERE workspace_id = (SELECT CAST(%s AS bigint)) AND subject = %s",
            [survivor_subject, workspace_id, absorbed_subject],
        ),
    ]


_MOVES = SubscriptionMove._meta.db_table
_SUBSCRIPTIONS = Subscription._meta.db_table
_RESERVATIONS = Reservation._meta.db_table


@receiver(user_restored, dispatch_uid="entitlements.return_restored_users_subscriptions")
def return_restored_users_subscriptions(
    sender, *, workspace_id: int, restored_pk: int, survivor_pk: int, **kwargs
) -> None:
    """An undone merge gives the restored user back the subscriptions it brought, whatever
    their status now; the survivor keeps its own and those it took out later. (Holds are
    left with the survivor: they are short and expire by themselves.)"""
    moves = SubscriptionMove.objects.for_workspace(workspace_id).filter(
        from_user_key=restored_pk, to_user_key=survivor_pk
    )
    returned = list(moves.values_list("subscription_id", flat=True))
    if returned:
        Subscription.objects.for_workspace(workspace_id).filter(pk__in=returned, user_id=survivor_pk).update(
            user_id=restored_pk, updated_at=timezone.now()
        )
        moves.delete()


@receiver(user_deleting, dispatch_uid="entitlements.forget_deleted_users_moves")
def forget_deleted_users_moves(sender, *, workspace_id: int, user_pk: int, **kwargs) -> None:
    """A deleted user's subscriptions go with it (cascade); the notes of moves to or from it
    would point at nobody."""
    SubscriptionMove.objects.for_workspace(workspace_id).filter(to_user_key=user_pk).delete()
    SubscriptionMove.objects.for_workspace(workspace_id).filter(from_user_key=user_pk).delete()
