"""Reads of users: lists with flags, duplicate groups, userIds, merge history, status counts."""

from collections import defaultdict
from dataclasses import dataclass

from django.db.models import BooleanField, Case, Count, Exists, OuterRef, Q, QuerySet, Value, When

from kana.models import Workspace

from .models import EndUser, MergeRecord, UserFlag, UserIdentity


def _same_email_exists():
    """Another user of the workspace has this user's email key (use only where it is not empty)."""
    return Exists(
        EndUser.objects.filter(workspace_id=OuterRef("workspace_id"), email_key=OuterRef("email_key"))
        .exclude(pk=OuterRef("pk"))
        .exclude(email_key="")
    )


def _has_same_email():
    # An empty email is nobody's "same email", decided before the EXISTS runs: for the empty
    # key it walked every other user without an email, once per user, so lists, deep pages and
    # the export were quadratic in the users that tracks create (userId only, no email).
    return Case(When(email_key="", then=Value(False)), default=_same_email_exists(), output_field=BooleanField())


def _has_billing_conflict():
    """An automatic merge into this user, still standing, dropped a different billing id."""
    return Exists(
        MergeRecord.objects.filter(
            workspace_id=OuterRef("workspace_id"),
            survivor_key=OuterRef("pk"),
            billing_conflict=True,
            undone_at__isnull=True,
        )
    )


def sharing_an_email(users: QuerySet[EndUser]) -> QuerySet[EndUser]:
    """The users that share their (non-empty) email: a plain semi-join PostgreSQL can hash."""
    return users.exclude(email_key="").filter(_same_email_exists())


def users_with_flags(workspace: Workspace) -> QuerySet[EndUser]:
    """The workspace's users, each annotated ``has_same_email``; see ``flags_of``."""
    return EndUser.objects.for_workspace(workspace).annotate(
        has_same_email=_has_same_email(), has_billing_conflict=_has_billing_conflict()
    )


def flags_of(user: EndUser) -> list[str]:
    """A user's flags. ``user`` should come from ``users_with_flags`` (else one query)."""
    flags = []
    if not user.billing_id:
        flags.append(UserFlag.NO_BILLING_ID.value)
    same_email = getattr(user, "has_same_email", None)
    if same_email is None:
        same_email = bool(user.email_key) and (
            EndUser.objects.for_workspace(user.workspace_id)
            .filter(email_key=user.email_key)
            .exclude(pk=user.pk)
            .exists()
        )
    if same_email:
        flags.append(UserFlag.SAME_EMAIL.value)
    billing_conflict = getattr(user, "has_billing_conflict", None)
    if billing_conflict is None:
        billing_conflict = (
            MergeRecord.objects.for_workspace(user.workspace_id)
            .filter(survivor_key=user.pk, billing_conflict=True, undone_at__isnull=True)
            .exists()
        )
    if billing_conflict:
        flags.append(UserFlag.BILLING_CONFLICT.value)
    return flags


def user_list(
    workspace: Workspace,
    *,
    users: QuerySet[EndUser] | None = None,
    user_id: str | None = None,
    email: str | None = None,
    flag: str | None = None,
    search: str | None = None,
) -> QuerySet[EndUser]:
    """Users filtered as the REST API and dashboard offer, newest first.

    ``user_id`` matches any userId of a user (aliases and absorbed users' ids too);
    ``email`` is case-insensitive; ``search`` looks in userIds, name, email and billing id.
    ``users`` is where to start (the REST API's workspace-scoped queryset); default: all of
    the workspace's users.
    """
    users = (users if users is not None else EndUser.objects.for_workspace(workspace)).annotate(
        has_same_email=_has_same_email(), has_billing_conflict=_has_billing_conflict()
    )
    if user_id:
        users = users.filter(identities__external_id=user_id)
    if email:
        users = users.filter(email_key=email.strip().lower())
    if flag == UserFlag.NO_BILLING_ID:
        users = users.filter(billing_id="")
    elif flag == UserFlag.SAME_EMAIL:
        users = sharing_an_email(users)
    elif flag == UserFlag.BILLING_CONFLICT:
        users = users.filter(has_billing_conflict=True)
    if search:
        term = search.strip()
        users = users.filter(
            Q(name__icontains=term)
            | Q(email_key__contains=term.lower())
            | Q(billing_id__icontains=term)
            | Q(
                pk__in=UserIdentity.objects.for_workspace(workspace)
                .filter(external_id__icontains=term)
                .values("user_id")
            )
        )
    return users.order_by("-created_at", "-pk")


def user_pk_for(workspace: Workspace | int, external_id: str) -> int | None:
    """The id of the user a userId resolves to (canonical, alias or absorbed user's), or None."""
    return (
        UserIdentity.objects.for_workspace(workspace)
        .filter(external_id=external_id)
        .values_list("user_id", flat=True)
        .first()
    )


def user_ids_by_user(user_pks: list[int]) -> dict[int, list[str]]:
    """Every userId of each user, oldest first (the canonical one is put first by callers)."""
    ids: dict[int, list[str]] = defaultdict(list)
    for user_pk, external_id in (
        UserIdentity.objects.filter(user_id__in=user_pks)
        .order_by("created_at", "pk")
        .values_list("user_id", "external_id")
    ):
        ids[user_pk].append(external_id)
    return ids


def user_ids_of(user: EndUser, known: list[str] | None = None) -> list[str]:
    """Every userId that resolves to the user, canonical first."""
    ids = known if known is not None else user_ids_by_user([user.pk]).get(user.pk, [])
    if user.user_id and user.user_id in ids:
        return [user.user_id, *[i for i in ids if i != user.user_id]]
    return list(ids)


@dataclass
class DuplicateGroup:
    email: str
    users: list[EndUser]


def duplicate_groups(workspace: Workspace, *, limit: int = 200) -> list[DuplicateGroup]:
    """Groups of users sharing an email (the ``same_email`` flag), oldest user first."""
    keys = list(
        EndUser.objects.for_workspace(workspace)
        .exclude(email_key="")
        .values("email_key")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .order_by("email_key")
        .values_list("email_key", flat=True)[:limit]
    )
    grouped: dict[str, list[EndUser]] = defaultdict(list)
    for user in users_with_flags(workspace).filter(email_key__in=keys).order_by("created_at", "pk"):
        grouped[user.email_key].append(user)
    return [DuplicateGroup(email=key, users=grouped[key]) for key in keys if len(grouped[key]) > 1]


def merge_history(
    workspace: Workspace, *, records: QuerySet[MergeRecord] | None = None, user_pk: int | None = None
) -> QuerySet[MergeRecord]:
    """The ledger, newest first; ``user_pk`` keeps the merges into that user."""
    records = records if records is not None else MergeRecord.objects.for_workspace(workspace)
    if user_pk is not None:
        records = records.filter(survivor_key=user_pk)
    return records.order_by("-created_at", "-pk")
