"""What entitlements does when users change below it (connected in ``EntitlementsConfig.ready``)."""

from django.dispatch import receiver
from django.utils import timezone

from users.signals import user_absorbed, user_deleting, user_restored

from .models import Reservation, Subscription, SubscriptionMove
from .services import subject_key


@receiver(user_absorbed, dispatch_uid="entitlements.follow_absorbed_user")
def follow_absorbed_user(sender, *, workspace_id: int, absorbed_pk: int, survivor_pk: int, **kwargs) -> None:
    """A merged user's subscriptions and holds go to the survivor, in the merge's transaction
    (the absorbed user's row is deleted next, which would otherwise delete them). Each moved
    subscription is noted, so that undoing the merge hands it back."""
    subscriptions = Subscription.objects.for_workspace(workspace_id).filter(user_id=absorbed_pk)
    SubscriptionMove.objects.bulk_create(
        SubscriptionMove(
            workspace_id=workspace_id, subscription_id=pk, from_user_key=absorbed_pk, to_user_key=survivor_pk
        )
        for pk in subscriptions.values_list("pk", flat=True)
    )
    subscriptions.update(user_id=survivor_pk, updated_at=timezone.now())
    Reservation.objects.for_workspace(workspace_id).filter(user_id=absorbed_pk).update(user_id=survivor_pk)
    Reservation.objects.for_workspace(workspace_id).filter(subject=subject_key(user_pk=absorbed_pk)).update(
        subject=subject_key(user_pk=survivor_pk)
    )


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
