"""Rows that only create are decided for the whole chunk at once (``_rows_that_only_create``)
and skip the row-by-row rules: an import gives exactly what the per-row services give."""

import csv
import io
import re

import pytest

from kana.models import Workspace
from users import csv_import, identity, services
from users.csv_import import open_import_report
from users.models import EndUser, MergeRecord, UserIdentity
from users.profile import validated_changes
from users.services import ProfileRow

from .csv_helpers import T0, bare, csv_bytes, export_rows, identify, run_import

pytestmark = pytest.mark.django_db


def seed(workspace) -> None:
    """Existing users the file claims, merges, updates and conflicts with; one suppressed userId."""
    identify(workspace, "u1", name="Ann", email="a@example.com", at=T0)
    bare(workspace, email="b@example.com", at=T0)  # claimed by a new userId
    bare(workspace, email="g@example.com", name="Gee", at=T0)  # absorbs u6
    identify(workspace, "u6", name="Eff", at=T0)
    identify(workspace, "u8", email="h@example.com", at=T0)  # two users with h@: ambiguous
    identify(workspace, "u9", email="h@example.com", at=T0)
    bare(workspace, email="k@example.com", at=T0)  # with u10 below: a new userId and k@ is ambiguous
    identify(workspace, "u10", email="k@example.com", at=T0)
    gone = identify(workspace, "gone", name="Gone", at=T0)
    services.delete_user(workspace=workspace, user_pk=gone.pk)


def clean_rows() -> list[dict]:
    """Rows without errors: creates of every shape (some with characters COPY escapes) among
    rows that claim, merge, update, or create next to an existing email (flagged)."""
    rows = []
    for i in range(12):
        rows.append({"user_id": f"new-{i}", "name": f"New {i}", "email": f"new{i}@example.com"})
        if i % 3 == 0:
            rows.append({"email": f"bare{i}@example.com", "name": f"Bare {i}"})  # email only
        if i % 4 == 1:
            rows.append({"user_id": f"idonly-{i}", "billing_id": f"cus_{i}"})  # userId only, Stripe
    rows += [
        {"user_id": "tab\tnew", "name": "back\\slash\ttab", "email": "odd@example.com"},
        {"user_id": "nl-new", "name": "two\nlines\r\nend", "billing_id": "AbC-1"},
        {"user_id": "\\N", "name": "\\N"},  # COPY's NULL, as text
        {"user_id": "uni-\u2028\u00e9", "name": "caf\u00e9 \u00a0\x01"},  # not printable, not special
        {"user_id": "u1", "name": "Ann 2"},  # update
        {"user_id": "claim-b", "email": "b@example.com"},  # claims the bare b@ user
        {"user_id": "u6", "email": "g@example.com"},  # merges u6 into g@ (older)
        {"user_id": "new-h", "email": "h@example.com"},  # created, flagged same_email
        {"user_id": "new-k", "email": "K@example.com"},  # k@ has a bare user and u10: flagged, no claim
        {"user_id": "pair-1", "email": "pair@example.com"},  # two new userIds, one new email:
        {"user_id": "pair-2", "email": "pair@example.com"},  # both created
    ]
    return rows


def error_rows() -> list:
    return [
        {"user_id": "new-0", "name": "again"},  # duplicate of a created user
        {"email": "NEW1@example.com"},  # the user created with new1@: duplicate
        {"user_id": "later-0", "email": "bare0@example.com"},  # claims a bare user made earlier: duplicate
        {"email": "h@example.com"},  # several users: ambiguous_email
        {"user_id": "gone", "name": "Back"},  # suppressed
        {"user_id": "bad-mail", "email": "not an email"},  # invalid value
        {"kana_id": "abc"},  # invalid kana_id
        {"name": "nobody"},  # no identifier
        ["", "short"],  # wrong field count
    ]


def file_of(rows: list) -> bytes:
    return csv_bytes(rows)


def report_of(job) -> list[tuple]:
    """The full report with the kana_ids (which differ between workspaces) left out."""
    with open_import_report(job) as report:
        lines = list(csv.reader(io.TextIOWrapper(report, encoding="utf-8", newline="")))
    return [(r[0], r[1], re.sub(r"\d+", "#", r[2]), r[3], re.sub(r"\d+", "#", r[5])) for r in lines]


def sample_of(job) -> list[dict]:
    return [{**row, "kana_id": None, "note": row["note"] and re.sub(r"\d+", "#", row["note"])} for row in job.sample]


def users_of(workspace) -> list[tuple]:
    users = []
    for user in EndUser.objects.for_workspace(workspace).order_by("created_at", "pk"):
        ids = sorted(UserIdentity.objects.filter(user=user).values_list("external_id", flat=True))
        users.append(
            (
                user.user_id,
                user.name,
                user.name_set_at is None,
                user.email,
                user.email_key,
                user.email_set_at is None,
                user.billing_id,
                user.billing_provider,
                user.billing_set_at is None,
                user.audiences,
                ids,
            )
        )
    return users


def database_of(workspace) -> tuple:
    flags = sorted((row["user_id"], row["email"], row["flags"]) for row in export_rows(workspace))
    merges = sorted(MergeRecord.objects.for_workspace(workspace).values_list("reason", "source"))
    return users_of(workspace), flags, merges


def import_both_ways(data: bytes):
    per_row_ws, set_ws = Workspace.objects.create(name="per row"), Workspace.objects.create(name="set based")
    seed(per_row_ws)
    seed(set_ws)
    expected = run_import(per_row_ws, data, row_by_row=True)
    got = run_import(set_ws, data)
    return (per_row_ws, expected), (set_ws, got)


@pytest.mark.parametrize("chunk", [4, 1000], ids=["rows across chunks", "one chunk"])
def test_an_import_with_every_kind_of_row_reports_what_the_per_row_services_report(monkeypatch, chunk):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", chunk)
    rows = clean_rows()
    # The errors spread among the other rows, so creates sit on both sides of them.
    for offset, bad in enumerate(error_rows()):
        rows.insert(3 + 4 * offset, bad)
    (_, expected), (_, got) = import_both_ways(file_of(rows))

    assert got.counts() == expected.counts()
    assert got.counts()["error"] == len(error_rows()) and not got.applied
    assert report_of(got) == report_of(expected)
    assert sample_of(got) == sample_of(expected)
    codes = {row["code"] for row in expected.sample if row["code"]}
    assert codes == {
        "duplicate_row",
        "ambiguous_email",
        "user_suppressed",
        "invalid_email",
        "invalid_kana_id",
        "missing_identifier",
        "wrong_field_count",
    }


@pytest.mark.parametrize("chunk", [4, 1000], ids=["rows across chunks", "one chunk"])
def test_an_applied_import_leaves_the_users_identities_flags_and_merges_of_the_per_row_services(monkeypatch, chunk):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", chunk)
    (per_row_ws, expected), (set_ws, got) = import_both_ways(file_of(clean_rows()))

    assert expected.applied and got.applied
    assert got.counts() == expected.counts()
    assert {name for name, n in expected.counts().items() if n} == {"created", "updated", "merged"}
    assert report_of(got) == report_of(expected)
    assert sample_of(got) == sample_of(expected)
    assert database_of(set_ws) == database_of(per_row_ws)
    # The escaped characters arrive as they were in the file.
    assert EndUser.objects.for_workspace(set_ws).get(user_id="tab\tnew").name == "back\\slash\ttab"
    assert EndUser.objects.for_workspace(set_ws).get(user_id="nl-new").name == "two\nlines\r\nend"
    assert EndUser.objects.for_workspace(set_ws).get(user_id="\\N").name == "\\N"
    assert EndUser.objects.for_workspace(set_ws).get(user_id="uni-\u2028\u00e9").name == "caf\u00e9 \u00a0\x01"


def test_rows_that_only_create_skip_the_row_by_row_rules(tenant, monkeypatch):
    """Only the rows that meet an existing user, or another row's userId or email, are
    decided one at a time."""
    identify(tenant.workspace, "old", email="old@example.com", at=T0)
    decided_one_at_a_time = []
    apply_row = identity._apply_row

    def counting(state, row, *args, **kwargs):
        decided_one_at_a_time.append(row.label)
        return apply_row(state, row, *args, **kwargs)

    monkeypatch.setattr(identity, "_apply_row", counting)

    def row(label, user_pk=None, user_id=None, **fields):
        return ProfileRow(changes=validated_changes(**fields)[0], user_pk=user_pk, user_id=user_id, label=label)

    rows = [
        row("fresh", user_id="fresh", email="fresh@example.com"),
        row("fresh email", email="solo@example.com"),
        row("fresh id", user_id="lonely"),
        row("existing id", user_id="old", name="Old"),
        row("existing email", user_id="other", email="OLD@example.com"),
        row("twice 1", user_id="twice"),
        row("twice 2", user_id="twice"),
        row("mail 1", user_id="m1", email="same@example.com"),
        row("mail 2", email="same@example.com"),
        row("no identifier", name="x"),
    ]
    outcomes = services.apply_profile_rows(workspace=tenant.workspace, rows=rows, occurred_at=T0, touched={})

    assert decided_one_at_a_time == [
        "existing id",
        "existing email",
        "twice 1",
        "twice 2",
        "mail 1",
        "mail 2",
        "no identifier",
    ]
    assert [getattr(o, "outcome", getattr(o, "code", None)) for o in outcomes] == [
        "created",
        "created",
        "created",
        "updated",
        "created",
        "created",
        "duplicate_row",
        "created",
        "duplicate_row",
        "missing_identifier",
    ]
    fresh = EndUser.objects.for_workspace(tenant.workspace).get(user_id="fresh")
    assert (fresh.email, fresh.email_key, fresh.email_set_at, fresh.name_set_at) == (
        "fresh@example.com",
        "fresh@example.com",
        T0,
        None,
    )
    assert UserIdentity.objects.get(external_id="fresh").user_id == fresh.pk
    assert EndUser.objects.for_workspace(tenant.workspace).get(email_key="solo@example.com").user_id is None
