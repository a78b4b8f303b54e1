"""Reading identity state back in the identity tests: who a userId resolves to, flags, counts.

Setup goes through the real services (``bare_user`` is the CSV/Stripe path), and the
assertions read the database, so every test sees what a client of Kana would see.
"""

from datetime import UTC, datetime, timedelta

from features.models import Event
from users.models import EndUser, MergeRecord, UserIdentity
from users.profile import validated_changes
from users.selectors import flags_of, users_with_flags
from users.services import update_user, upsert_user_by_email

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def iso(minutes: int) -> str:
    return at(minutes).isoformat().replace("+00:00", "Z")


def bare_user(tenant, email: str, *, name=None, billing_id=None, occurred_at: datetime = T0) -> EndUser:
    """A user without a userId, as a Stripe or CSV import creates it."""
    fields = {"email": email}
    if name is not None:
        fields["name"] = name
    if billing_id is not None:
        fields["billing_id"] = billing_id
    changes, problems = validated_changes(**fields)
    assert not problems
    return upsert_user_by_email(workspace=tenant.workspace, changes=changes, occurred_at=occurred_at).user


def set_email(user: EndUser, email: str, *, occurred_at: datetime = T0) -> EndUser:
    """Set a user's email directly (REST update, CSV row with kana_id): no identify rules."""
    changes, problems = validated_changes(email=email)
    assert not problems
    return update_user(workspace=user.workspace, user_pk=user.pk, changes=changes, occurred_at=occurred_at).user


def user_for(tenant, user_id: str) -> EndUser | None:
    """The user a userId resolves to in the tenant's workspace (its own id or an alias)."""
    identity = (
        UserIdentity.objects.for_workspace(tenant.workspace).filter(external_id=user_id).select_related("user").first()
    )
    return identity.user if identity else None


def all_users(tenant) -> list[EndUser]:
    return list(users_with_flags(tenant.workspace).order_by("pk"))


def flags(user: EndUser) -> list[str]:
    return flags_of(users_with_flags(user.workspace_id).get(pk=user.pk))


def identities_of(user: EndUser) -> set[str]:
    return set(UserIdentity.objects.filter(user=user).values_list("external_id", flat=True))


def counts(tenant) -> tuple[int, int, int, int]:
    """(users, userIds, events, merges) of the workspace: for "nothing was written" checks."""
    workspace = tenant.workspace
    return (
        EndUser.objects.for_workspace(workspace).count(),
        UserIdentity.objects.for_workspace(workspace).count(),
        Event.objects.for_workspace(workspace).count(),
        MergeRecord.objects.for_workspace(workspace).count(),
    )


def ok(response) -> dict:
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["success"] is True
    return body
