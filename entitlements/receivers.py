"""What entitlements does when users change below it (connected in ``EntitlementsConfig.ready``)."""

from django.dispatch import receiver

from users.signals import user_absorbed

from .models import Reservation, Subscription
from .services import subject_key


@receiver(user_absorbed, dispatch_uid="entitlements.follow_absorbed_user")
def follow_absorbed_user(sender, *, workspace_id: int, absorbed_pk: int, survivor_pk: int, **kwargs) -> None:
    """A merged user's subscriptions and holds go to the survivor, in the merge's transaction
    (the absorbed user's row is deleted next, which would otherwise delete them)."""
    Subscription.objects.for_workspace(workspace_id).filter(user_id=absorbed_pk).update(user_id=survivor_pk)
    Reservation.objects.for_workspace(workspace_id).filter(user_id=absorbed_pk).update(user_id=survivor_pk)
    Reservation.objects.for_workspace(workspace_id).filter(subject=subject_key(user_pk=absorbed_pk)).update(
        subject=subject_key(user_pk=survivor_pk)
    )
