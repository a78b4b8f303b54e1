"""The set-based ``apply_profile_rows`` gives exactly what the per-row services give."""

import re
from functools import partial

import pytest
from django.db import connection
from django.utils import timezone

from kana.models import Workspace
from users import bulk, services
from users.models import EndUser, MergeRecord, UserIdentity
from users.profile import validated_changes
from users.services import ProfileRow

from .conftest import is_postgres, requires_postgres
from .csv_helpers import T0, bare, identify

pytestmark = pytest.mark.django_db


def seed(workspace) -> dict[str, int]:
    """Users covering every rule, created in this order (the survivor of a merge is the oldest)."""
    users = {}
    users["A"] = identify(workspace, "u1", name="Ann", email="a@example.com", at=T0)
    users["B"] = bare(workspace, email="b@example.com", at=T0)
    users["C"] = identify(workspace, "u3", email="c@example.com", billing_id="cus_c", at=T0)
    users["D"] = bare(workspace, email="dd@example.com", at=T0)
    users["E"] = identify(workspace, "u5", email="d@example.com", at=T0)
    changes, _ = validated_changes(email="d@example.com")
    services.update_user(workspace=workspace, user_pk=users["D"].pk, changes=changes, occurred_at=T0)
    users["G"] = bare(workspace, email="g@example.com", name="Gee", at=T0)
    users["F"] = identify(workspace, "u6", name="Eff", at=T0)
    users["H"] = identify(workspace, "u8", email="h@example.com", at=T0)
    users["I"] = identify(workspace, "u9", email="h@example.com", at=T0)
    users["P"] = bare(workspace, email="p@example.com", at=T0)
    users["Q"] = bare(workspace, email="q@example.com", at=T0)
    return {label: user.pk for label, user in users.items()}


def rows_for(pks: dict[str, int]) -> list[ProfileRow]:
    def row(user_pk=None, user_id=None, **fields):
        changes, problems = validated_changes(**fields)
        assert not problems
        return ProfileRow(changes=changes, user_pk=user_pk, user_id=user_id)

    rows = [
        row(user_id="u1", name="Ann 2"),  # update
        row(user_id="u1"),  # duplicate
        row(user_id="new1", email="b@example.com"),  # claims B
        row(user_id="u6", email="g@example.com"),  # merges F into G (older)
        row(user_id="new2", email="d@example.com"),  # ambiguous: created, flagged
        row(user_id="u5", email="d@example.com"),  # ambiguous now (row 5's user shares d@): no merge
        row(email="h@example.com", billing_id="cus_h"),  # several users: error
        row(user_pk=pks["P"], email="p2@example.com"),  # P leaves p@ ...
        row(user_id="new3", email="p@example.com"),  # ... so this creates instead of claiming P
        row(email="q@example.com", name="Que"),  # updates Q
        row(user_id="new4", email="q@example.com"),  # would claim Q: duplicate
        row(user_pk=999_999_999, name="x"),  # unknown
        row(user_pk=pks["A"], user_id="u3"),  # mismatch
        row(email="new@example.com"),  # creates a bare user
        row(email=" NEW@example.com", name="N"),  # the same user again: duplicate
        row(user_id="u3"),  # unchanged
        row(user_pk=pks["F"], name="gone"),  # absorbed by row 4: unknown
        row(user_id="u6", name="G again"),  # resolves to the survivor: duplicate
        row(name="nobody"),  # no identifier
        row(user_id="new5", name="Five"),  # created
        row(user_pk=pks["C"], user_id="u3", billing_id="cus_c2"),  # C named by row 16: duplicate
        row(user_pk=pks["H"], user_id="u8", billing_id="AbC-1"),  # chargebee
        row(user_id="new1", name="claimed"),  # B again via its new userId: duplicate
    ]
    for number, r in enumerate(rows, start=2):
        r.label = f"row {number}"
    return rows


def described(outcome) -> tuple:
    if isinstance(outcome, services.IdentityError):
        return ("error", outcome.code, outcome.message)
    user = outcome.user
    return (outcome.outcome, outcome.ambiguous, user.user_id, user.email, len(outcome.absorbed_ids))


def state(workspace) -> tuple:
    users = []
    for user in EndUser.objects.for_workspace(workspace).order_by("created_at", "pk"):
        ids = sorted(UserIdentity.objects.filter(user=user).values_list("external_id", flat=True))
        users.append((user.user_id, user.name, user.email, user.email_key, user.billing_id, user.billing_provider, ids))
        assert user.updated_at is not None
    merges = sorted(MergeRecord.objects.for_workspace(workspace).values_list("reason", "source"))
    return users, merges


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_bulk_and_per_row_paths_give_identical_results(chunk):
    per_row_ws, bulk_ws = Workspace.objects.create(name="rows"), Workspace.objects.create(name="bulk")
    per_row_pks, bulk_pks = seed(per_row_ws), seed(bulk_ws)
    at = timezone.now()

    def run(apply, workspace, pks):
        rows, touched, outcomes = rows_for(pks), {}, []
        for start in range(0, len(rows), chunk):
            outcomes += apply(
                workspace=workspace, rows=rows[start : start + chunk], occurred_at=at, touched=touched, actor="t"
            )
        return [described(o) for o in outcomes]

    expected = run(partial(services.apply_profile_rows, one_at_a_time=True), per_row_ws, per_row_pks)
    got = run(services.apply_profile_rows, bulk_ws, bulk_pks)

    # Messages may name kana_ids, which differ between the two workspaces.
    def without_ids(outcomes):
        return [tuple(re.sub(r"id \d+", "id #", v) if isinstance(v, str) else v for v in o) for o in outcomes]

    assert [o[:2] for o in got] == [o[:2] for o in expected]
    assert without_ids(got) == without_ids(expected)
    assert state(bulk_ws) == state(per_row_ws)
    # The scenario does exercise every rule.
    kinds = {o[0] if o[0] != "error" else o[1] for o in expected}
    assert kinds == {
        "updated",
        "claimed",
        "merged",
        "created",
        "unchanged",
        "duplicate_row",
        "ambiguous_email",
        "unknown_user",
        "user_id_mismatch",
        "missing_identifier",
    }
    assert [o[1] for o in expected[4:6]] == [True, True]  # rows 6 and 7: flagged, not merged


def test_bulk_path_uses_a_fixed_number_of_queries(tenant, django_assert_max_num_queries):
    existing = [identify(tenant.workspace, f"old{i}", email=f"old{i}@example.com") for i in range(200)]
    rows = []
    for i, user in enumerate(existing):
        changes, _ = validated_changes(billing_id=f"cus_{i}")
        rows.append(ProfileRow(changes=changes, user_pk=user.pk, label=f"row {i}"))
    for i in range(200):
        changes, _ = validated_changes(email=f"new{i}@example.com", name=f"New {i}")
        rows.append(ProfileRow(changes=changes, user_id=f"new{i}", label=f"row {200 + i}"))
    # PostgreSQL: savepoint, identities, users, ids for new users, COPY of the users and of
    # their identities, scratch table and its COPY, update, truncate, release.
    # SQLite splits bulk statements into batches of 999 parameters: more, but not one per row.
    with django_assert_max_num_queries(11 if is_postgres() else 40):
        outcomes = services.apply_profile_rows(
            workspace=tenant.workspace, rows=rows, occurred_at=timezone.now(), touched={}
        )
    assert {o.outcome for o in outcomes[:200]} == {"updated"} and {o.outcome for o in outcomes[200:]} == {"created"}
    assert EndUser.objects.for_workspace(tenant.workspace).filter(billing_provider="stripe").count() == 200
    assert UserIdentity.objects.for_workspace(tenant.workspace).filter(external_id__startswith="new").count() == 200


@requires_postgres
def test_array_literals_carry_any_text_and_id_to_postgresql():
    texts = ['a"b', "back\\slash", "tail\\", "{braces},commas", " spaced ", "", "NULL", "ünï\tcode\n", "'quote'"]
    ids = [1, 2**62, 0, 42]
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::text[], %s::bigint[]", [bulk.text_array(texts), bulk.int_array(ids)])
        assert cursor.fetchone() == (texts, ids)


def test_user_ids_with_quotes_and_backslashes_are_found_again(tenant):
    odd = ['q"uote', "back\\slash", "{x,y}", "NULL"]
    for user_id in odd:
        identify(tenant.workspace, user_id, name="before", at=T0)
    rows = [ProfileRow(changes=validated_changes(name="after")[0], user_id=u, label=u) for u in odd]

    outcomes = services.apply_profile_rows(
        workspace=tenant.workspace, rows=rows, occurred_at=timezone.now(), touched={}, actor="t"
    )

    assert [o.outcome for o in outcomes] == ["updated"] * len(odd)
    assert EndUser.objects.for_workspace(tenant.workspace).filter(name="after").count() == len(odd)
