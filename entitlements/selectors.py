"""Reads of subscriptions that the upper layers (dashboard, REST) show as warnings."""

from collections import defaultdict

from kana.models import Workspace

from .models import LIVE_STATUSES, Subscription


def live_base_subscriptions(workspace: Workspace | int, user_pks) -> dict[int, list[Subscription]]:
    """Each listed user's own live base subscriptions (not its groups'), oldest first.

    One live base package per subject is enforced when a subscription is created or changed
    (``services._check_package_rules``), but a merge moves the absorbed user's subscriptions
    to the survivor as they are: two users on two plans become one user on two. Kana does not
    guess which plan is right (the check still answers, the highest limit winning); it shows
    the case, before the merge in its preview and after it on the user's plan page, so that
    an admin cancels one."""
    found: dict[int, list[Subscription]] = defaultdict(list)
    subscriptions = (
        Subscription.objects.for_workspace(workspace)
        .filter(user_id__in=list(user_pks), status__in=LIVE_STATUSES, package__is_addon=False)
        .select_related("package")
        .order_by("started_at", "pk")
    )
    for subscription in subscriptions:
        found[subscription.user_id].append(subscription)
    return dict(found)
