"""The users a CSV chunk would create are built ahead of the engine's read
(``users.identity.build_new_users``, while PostgreSQL checks the previous chunk); the engine
still decides, after its read, which rows only create, and only those take their built user.
Same outcomes, same users, same ``created_at`` order as building them in the engine; a retried
pass builds its own (tests/test_identity_engine_races.py, with a real concurrent identify)."""

import time

import pytest
from django.utils import timezone

from users import services
from users.csv_import import ProfileRow, _refuse_suppressed
from users.identity import IdentifyOutcome, build_new_users
from users.models import EndUser
from users.profile import validated_changes

from .csv_helpers import bare, identify

pytestmark = pytest.mark.django_db

_FIELDS = ("user_id", "name", "email", "email_key", "billing_id", "billing_provider", "audiences")


def row(label: str, *, user_id=None, user_pk=None, **fields) -> ProfileRow:
    changes, problems = validated_changes(**fields)
    assert not problems
    return ProfileRow(changes=changes, user_id=user_id, user_pk=user_pk, label=label)


def mixed_rows(workspace) -> list[ProfileRow]:
    """Rows that only create, and rows that update, claim or create on the general path."""
    known = identify(workspace, "known", name="Known")
    bare(workspace, email="stripe@example.com", billing_id="cus_stripe")
    return [
        row("row 2", user_id="new-1", name="New 1", email="new1@example.com"),  # only creates
        row("row 3", user_pk=known.pk, name="Renamed"),  # kana_id: updates
        row("row 4", user_id="claimer", email="stripe@example.com"),  # claims the bare user
        row("row 5", user_id="shared-a", email="shared@example.com"),  # two rows name one email:
        row("row 6", user_id="shared-b", email="shared@example.com"),  # the general path creates both
        row("row 7", email="only-email@example.com", name="Bare"),  # only creates, bare
        *(row(f"row {8 + i}", user_id=f"bulk-{i}", billing_id=f"cus_{i}") for i in range(10)),  # COPY path
    ]


def stored(workspace) -> dict:
    users = EndUser.objects.for_workspace(workspace)
    return {u["user_id"] or u["email"]: u for u in users.values(*_FIELDS, "name_set_at", "billing_set_at")}


def test_only_creating_rows_take_their_built_users_and_the_rest_decide_as_before(tenant, other_tenant):
    now = timezone.now()
    rows = mixed_rows(tenant.workspace)
    built = build_new_users(workspace=tenant.workspace, rows=rows, occurred_at=now)
    assert built[1] is None  # a kana_id row never creates
    outcomes = services.apply_profile_rows(
        workspace=tenant.workspace, rows=rows, occurred_at=now, touched={}, new_users=built
    )

    plain = mixed_rows(other_tenant.workspace)
    expected = services.apply_profile_rows(workspace=other_tenant.workspace, rows=plain, occurred_at=now, touched={})

    assert [(o.outcome, o.ambiguous) for o in outcomes] == [(o.outcome, o.ambiguous) for o in expected]
    taken = [i for i, outcome in enumerate(outcomes) if outcome.user is built[i]]
    assert taken == [0, 5, *range(6, 16)]  # the rows that only create, no other
    assert [outcomes[i].outcome for i in (2, 3, 4)] == [IdentifyOutcome.CLAIMED, "created", "created"]
    ours, theirs = stored(tenant.workspace), stored(other_tenant.workspace)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert {f: ours[key][f] for f in _FIELDS} == {f: theirs[key][f] for f in _FIELDS}, key
    for outcome in outcomes:  # the users created here were stamped with the rows' time
        if outcome.outcome == "created" and outcome.user.name:
            assert outcome.user.name_set_at == now


def test_created_at_follows_the_rows_whichever_path_created_the_user(tenant):
    """A built user is stamped when the engine takes it, not when it was built: a user the
    general path creates for an earlier row is not younger than a later row's built user."""
    rows = [
        row("row 2", user_id="first-a", email="twice@example.com"),  # general path (email named twice)
        row("row 3", user_id="first-b", email="twice@example.com"),
        *(row(f"row {4 + i}", user_id=f"later-{i}") for i in range(10)),  # only create
    ]
    built = build_new_users(workspace=tenant.workspace, rows=rows, occurred_at=timezone.now())
    time.sleep(0.01)  # the rows are applied well after their users were built
    services.apply_profile_rows(
        workspace=tenant.workspace, rows=rows, occurred_at=timezone.now(), touched={}, new_users=built
    )
    order = list(EndUser.objects.for_workspace(tenant.workspace).order_by("created_at", "id").values_list("user_id"))
    assert [user_id for (user_id,) in order] == [r.user_id for r in rows]


def test_the_rows_left_after_suppressed_ones_keep_their_own_built_users(tenant):
    gone = identify(tenant.workspace, "gone", name="Gone")
    services.delete_user(workspace=tenant.workspace, user_pk=gone.pk)
    rows = [row("row 2", user_id="a", name="A"), row("row 3", user_id="gone"), row("row 4", user_id="c", name="C")]
    parsed = list(enumerate(rows, start=2))
    built = build_new_users(workspace=tenant.workspace, rows=rows, occurred_at=timezone.now())

    refused, to_apply, new_users = _refuse_suppressed(tenant.workspace, parsed, rows, {"a", "gone", "c"}, built)

    assert [getattr(r, "code", None) for _, r in refused] == [None, "user_suppressed", None]
    assert to_apply == [rows[0], rows[2]]
    assert new_users[0] is built[0] and new_users[1] is built[2]
    assert [u.name for u in new_users] == ["A", "C"]
