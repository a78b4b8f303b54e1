"""CSV import: the identity rules applied per row, all or nothing, and clear errors."""

import csv
import io

import pytest
from django.utils import timezone

from users import csv_import, services
from users.csv_import import CsvFileError, open_import_report
from users.models import EndUser, ImportJob, ImportStatus, MergeRecord
from users.profile import validated_changes

from .csv_helpers import T0, bare, csv_bytes, export_text, identify, result_rows, run_import, snapshot

pytestmark = pytest.mark.django_db


def seed(workspace):
    ann = identify(workspace, "u1", name="Ann", email="ann@example.com", billing_id="cus_ann", at=T0)
    bob = identify(workspace, "u2", name="Bob", email="bob@example.com", at=T0)
    stripe = bare(workspace, email="carl@example.com", name="Carl", billing_id="cus_carl", at=T0)
    shared = identify(workspace, "u3", name="Dee", email="bob@example.com", at=T0)
    return ann, bob, stripe, shared


def test_reimporting_an_unchanged_export_changes_nothing(tenant):
    seed(tenant.workspace)
    before = snapshot(tenant.workspace)
    data = export_text(tenant.workspace).encode()

    job = run_import(tenant.workspace, data)

    assert job.status == ImportStatus.DONE and job.applied
    assert job.counts() == {"created": 0, "updated": 0, "merged": 0, "unchanged": 4, "error": 0}
    assert [r for _, r, _ in result_rows(job)] == ["unchanged"] * 4
    assert snapshot(tenant.workspace) == before


def test_a_csv_row_repeating_values_keeps_the_field_times(tenant):
    ann = identify(tenant.workspace, "u1", name="Ann", email="ann@example.com", at=T0)
    changes, _ = validated_changes(name="Ann", email="ann@example.com", billing_id="cus_1")
    later = timezone.now()
    row = services.ProfileRow(changes=changes, user_id="u1", label="row 2")
    result = services.apply_profile_row(workspace=tenant.workspace, row=row, occurred_at=later)
    assert result.outcome == services.IdentifyOutcome.UPDATED
    ann.refresh_from_db()
    # A CSV row is not a message: only the field whose value changed moves its time.
    assert (ann.name_set_at, ann.email_set_at, ann.billing_set_at) == (T0, T0, later)
    again = services.apply_profile_row(workspace=tenant.workspace, row=row, occurred_at=timezone.now())
    assert again.outcome == services.IdentifyOutcome.UNCHANGED


def test_filling_billing_ids_into_the_export_sets_them(tenant):
    _ann, bob, _stripe, shared = seed(tenant.workspace)
    rows = list(csv.DictReader(io.StringIO(export_text(tenant.workspace))))
    for row in rows:
        if not row["billing_id"]:
            row["billing_id"] = f"cus_{row['user_id']}" if row["user_id"] != "u3" else "AzZ-chargebee.1"
    header = list(rows[0].keys())

    job = run_import(tenant.workspace, csv_bytes(rows, header))

    assert job.counts() == {"created": 0, "updated": 2, "merged": 0, "unchanged": 2, "error": 0}
    bob.refresh_from_db()
    shared.refresh_from_db()
    assert (bob.billing_id, bob.billing_provider) == ("cus_u2", "stripe")
    assert (shared.billing_id, shared.billing_provider) == ("AzZ-chargebee.1", "chargebee")
    assert bob.name_set_at == T0 and bob.email_set_at == T0  # untouched fields keep their times


def test_a_row_whose_email_matches_one_bare_user_merges_into_the_oldest(tenant):
    stripe = bare(tenant.workspace, email="x@example.com", billing_id="cus_x", at=T0)
    later = identify(tenant.workspace, "u1", name="Ann")  # created after the Stripe user

    job = run_import(tenant.workspace, csv_bytes([{"user_id": "u1", "email": "X@example.com"}]))

    assert result_rows(job) == [(2, "merged", None)]
    survivor = EndUser.objects.for_workspace(tenant.workspace).get()
    assert survivor.pk == stripe.pk  # the oldest survives
    assert (survivor.user_id, survivor.name, survivor.email, survivor.billing_id) == (
        "u1",
        "Ann",
        "X@example.com",
        "cus_x",
    )
    record = MergeRecord.objects.get()
    assert (record.absorbed_id, record.reason, record.actor, record.source) == (later.pk, "csv", "test", "row 2")
    assert job.sample[0]["kana_id"] == stripe.pk


def test_a_row_with_a_new_user_id_claims_the_bare_user(tenant):
    stripe = bare(tenant.workspace, email="x@example.com", at=T0)
    job = run_import(tenant.workspace, csv_bytes([{"user_id": "u9", "email": "x@example.com", "name": "Xi"}]))
    assert result_rows(job) == [(2, "updated", None)]
    assert "claimed" in job.sample[0]["note"]
    stripe.refresh_from_db()
    assert (stripe.user_id, stripe.name) == ("u9", "Xi")


def make_ambiguous(workspace):
    """Kana case 9's "before": a bare user and a user with a userId share x@example.com."""
    identify(workspace, "u2", email="x@example.com", at=T0)
    stripe = bare(workspace, email="y@example.com", at=T0)
    changes, _ = validated_changes(email="x@example.com")
    services.update_user(workspace=workspace, user_pk=stripe.pk, changes=changes, occurred_at=T0)


def test_an_ambiguous_row_is_flagged_not_merged(tenant):
    make_ambiguous(tenant.workspace)
    before_merges = MergeRecord.objects.count()

    job = run_import(tenant.workspace, csv_bytes([{"user_id": "u9", "email": "x@example.com"}]))

    assert result_rows(job) == [(2, "created", None)]
    assert "flagged same_email" in job.sample[0]["note"]
    assert EndUser.objects.for_workspace(tenant.workspace).filter(email_key="x@example.com").count() == 3
    assert MergeRecord.objects.count() == before_merges
    flags = {row["user_id"]: row["flags"] for row in csv.DictReader(io.StringIO(export_text(tenant.workspace)))}
    assert flags["u9"] == "no_billing_id;same_email"


def test_a_row_with_only_an_email_matching_several_users_asks_for_kana_id(tenant):
    identify(tenant.workspace, "u1", email="x@example.com")
    identify(tenant.workspace, "u2", email="x@example.com")
    before = snapshot(tenant.workspace)
    job = run_import(tenant.workspace, csv_bytes([{"email": "x@example.com", "billing_id": "cus_1"}]))
    assert result_rows(job) == [(2, "error", "ambiguous_email")]
    assert "kana_id" in job.sample[0]["error"]
    assert snapshot(tenant.workspace) == before


def test_rows_with_only_an_email_update_the_one_user_or_create_a_bare_one(tenant):
    ann = identify(tenant.workspace, "u1", email="ann@example.com")
    job = run_import(
        tenant.workspace,
        csv_bytes([{"email": "ANN@example.com ", "billing_id": "cus_a"}, {"email": "new@example.com", "name": "N"}]),
    )
    assert result_rows(job) == [(2, "updated", None), (3, "created", None)]
    ann.refresh_from_db()
    # The row's spelling of the email is the newest value (same key: still the same user).
    assert (ann.billing_id, ann.email) == ("cus_a", "ANN@example.com")
    created = EndUser.objects.for_workspace(tenant.workspace).get(email_key="new@example.com")
    assert created.user_id is None and created.name == "N"


def test_empty_cells_leave_fields_as_they_are(tenant):
    ann = identify(tenant.workspace, "u1", name="Ann", email="ann@example.com", billing_id="cus_a", at=T0)
    job = run_import(tenant.workspace, csv_bytes([{"kana_id": ann.pk, "name": "Annie"}]))
    assert result_rows(job) == [(2, "updated", None)]
    ann.refresh_from_db()
    assert (ann.name, ann.email, ann.billing_id) == ("Annie", "ann@example.com", "cus_a")


def test_a_dry_run_reports_what_apply_would_do_and_changes_nothing(tenant):
    seed(tenant.workspace)
    rows = [
        {"user_id": "u1", "name": "Ann B."},
        {"user_id": "u2"},
        {"user_id": "new", "email": "carl@example.com"},  # claims the Stripe user
        {"user_id": "u7", "email": "z@example.com"},
    ]
    before = snapshot(tenant.workspace)
    dry = run_import(tenant.workspace, csv_bytes(rows), dry_run=True)
    assert snapshot(tenant.workspace) == before
    assert dry.status == ImportStatus.DONE and not dry.applied and dry.dry_run

    applied = run_import(tenant.workspace, csv_bytes(rows))
    assert applied.applied
    assert (
        result_rows(dry)
        == result_rows(applied)
        == [
            (2, "updated", None),
            (3, "unchanged", None),
            (4, "updated", None),
            (5, "created", None),
        ]
    )


def test_any_row_error_changes_nothing_and_reports_every_row(tenant):
    ann, *_ = seed(tenant.workspace)
    rows = [
        {"user_id": "u1", "name": "Changed"},
        {"user_id": "u8", "email": "not-an-email"},
        {"user_id": "u9", "billing_id": "bad id!"},
        {"kana_id": "999999999"},
        {"kana_id": "abc"},
        {"kana_id": ann.pk, "name": "Again"},  # the same user as row 2
        {"user_id": "u10", "email": "ten@example.com"},
        {"user_id": "u10", "name": "Ten"},  # the same new user twice
        {"name": "Nobody"},
    ]
    before = snapshot(tenant.workspace)

    job = run_import(tenant.workspace, csv_bytes(rows))

    assert job.status == ImportStatus.DONE and not job.applied
    assert snapshot(tenant.workspace) == before
    assert result_rows(job) == [
        (2, "updated", None),
        (3, "error", "invalid_email"),
        (4, "error", "invalid_billing_id"),
        (5, "error", "unknown_kana_id"),
        (6, "error", "invalid_kana_id"),
        (7, "error", "duplicate_row"),
        (8, "created", None),
        (9, "error", "duplicate_row"),
        (10, "error", "missing_identifier"),
    ]
    assert job.counts() == {"created": 1, "updated": 1, "merged": 0, "unchanged": 0, "error": 7}
    assert "row 2" in job.sample[5]["error"]
    report = list(csv.reader(io.TextIOWrapper(open_import_report(job), encoding="utf-8")))
    assert report[0] == ["row", "result", "error", "code", "kana_id", "note"]
    assert [(r[0], r[1], r[3]) for r in report[1:]] == [(str(n), r, c or "") for n, r, c in result_rows(job)]


def test_kana_id_of_another_workspace_is_unknown(tenant, other_tenant):
    theirs = identify(other_tenant.workspace, "u1", name="Theirs")
    job = run_import(tenant.workspace, csv_bytes([{"kana_id": theirs.pk, "name": "Mine now"}]))
    assert result_rows(job) == [(2, "error", "unknown_kana_id")]
    theirs.refresh_from_db()
    assert theirs.name == "Theirs"


def test_a_user_id_that_is_not_the_kana_ids_is_an_error(tenant):
    ann = identify(tenant.workspace, "u1")
    identify(tenant.workspace, "u2")
    job = run_import(tenant.workspace, csv_bytes([{"kana_id": ann.pk, "user_id": "u2", "name": "X"}]))
    assert result_rows(job) == [(2, "error", "user_id_mismatch")]


def test_formula_cells_survive_the_round_trip(tenant):
    values = {"u1": "=cmd|'/c calc'!A0", "u2": "+1", "u3": "-2", "u4": "@SUM(A1)", "u5": "'=quoted", "u6": "'Tis"}
    for user_id, name in values.items():
        identify(tenant.workspace, user_id, name=name)
    exported = export_text(tenant.workspace)
    names = {row["user_id"]: row["name"] for row in csv.DictReader(io.StringIO(exported))}
    assert names == {
        "u1": "'=cmd|'/c calc'!A0",
        "u2": "'+1",
        "u3": "'-2",
        "u4": "'@SUM(A1)",
        "u5": "''=quoted",
        "u6": "'Tis",
    }
    before = snapshot(tenant.workspace)
    job = run_import(tenant.workspace, exported.encode())
    assert job.counts()["unchanged"] == 6 and snapshot(tenant.workspace) == before
    # A hand-written file uses the same convention: the quote is taken off.
    run_import(tenant.workspace, csv_bytes([{"user_id": "u7", "name": "'=2+2"}]))
    assert EndUser.objects.for_workspace(tenant.workspace).get(user_id="u7").name == "=2+2"


# --- The file as a whole ---------------------------------------------------------------


def assert_file_error(workspace, data: bytes, code: str, *words: str):
    before = snapshot(workspace)
    with pytest.raises(CsvFileError) as caught:
        run_import(workspace, data)
    assert caught.value.code == code
    for word in words:
        assert word in caught.value.message
    assert snapshot(workspace) == before
    return caught.value


def test_a_wrong_header_is_a_clear_error(tenant):
    seed(tenant.workspace)
    assert_file_error(tenant.workspace, b"kana_id,user_id,emial\n1,u1,a@b.co\n", "invalid_header", "'emial'")
    assert_file_error(tenant.workspace, b"name,created_at\nAnn,2024\n", "invalid_header", "at least one of")
    assert_file_error(tenant.workspace, b"email,email\na@b.co,a@b.co\n", "invalid_header", "twice")


def test_a_missing_header_is_a_clear_error(tenant):
    seed(tenant.workspace)
    assert_file_error(tenant.workspace, b"12,u1,Ann,ann@example.com,,,,\n", "missing_header", "header", "12,u1")


def test_an_empty_file_is_a_clear_error(tenant):
    assert_file_error(tenant.workspace, b"", "empty_file", "empty")
    assert_file_error(tenant.workspace, b"\xef\xbb\xbf\r\n", "empty_file")


def test_latin1_bytes_are_a_clear_error_naming_the_byte_and_line(tenant):
    seed(tenant.workspace)
    data = csv_bytes([{"user_id": "u1", "name": "Ann"}, {"user_id": "u2", "name": "José"}]).replace(
        "José".encode(), "José".encode("latin-1")
    )
    offset = data.index(b"\xe9")
    error = assert_file_error(tenant.workspace, data, "unsupported_encoding", "0xE9", f"byte {offset}", "line 3")
    assert "UTF-8" in error.message


def test_latin1_far_into_a_big_file_changes_nothing(tenant):
    rows = [{"user_id": f"u{i}", "name": f"N{i}"} for i in range(3000)] + [{"user_id": "x", "name": "Zoë"}]
    data = csv_bytes(rows).replace("Zoë".encode(), "Zoë".encode("cp1252"))
    assert_file_error(tenant.workspace, data, "unsupported_encoding", "line 3002")


def test_utf16_is_a_clear_error(tenant):
    data = csv_bytes([{"user_id": "u1"}]).decode().encode("utf-16")
    assert_file_error(tenant.workspace, data, "unsupported_encoding", "UTF-16")
    assert_file_error(tenant.workspace, data[2:], "unsupported_encoding", "NUL")


def test_a_bom_is_accepted(tenant):
    job = run_import(tenant.workspace, csv_bytes([{"user_id": "u1", "name": "Ann"}], bom=True))
    assert result_rows(job) == [(2, "created", None)]


def test_quoted_newlines_and_crlf_are_accepted(tenant):
    data = b'user_id,name,email\r\nu1,"Ann\r\nof ""Acme""",ann@example.com\r\nu2,"Bob\nTwo",\r\n'
    job = run_import(tenant.workspace, data)
    assert result_rows(job) == [(2, "created", None), (3, "created", None)]
    assert EndUser.objects.get(user_id="u1").name == 'Ann\r\nof "Acme"'
    assert EndUser.objects.get(user_id="u2").name == "Bob\nTwo"


def test_a_row_with_too_few_fields_is_a_row_error(tenant):
    job = run_import(tenant.workspace, b"user_id,name\nu1,Ann\nu2\n\nu3,C\n")
    assert result_rows(job) == [(2, "created", None), (3, "error", "wrong_field_count"), (5, "created", None)]
    assert not EndUser.objects.exists()


def test_a_row_naming_a_deleted_users_suppressed_user_id_is_an_error_until_lifted(tenant):
    """An import does not bring back a user deleted on request: its row is refused like a
    Segment message naming it; once the suppression is lifted the same file imports."""
    from users.models import Suppression

    gone = identify(tenant.workspace, "gone", name="Gone", email="gone@example.com", at=T0)
    services.delete_user(workspace=tenant.workspace, user_pk=gone.pk)
    data = csv_bytes([{"user_id": "gone", "name": "Back"}, {"user_id": "fresh", "name": "New"}])

    job = run_import(tenant.workspace, data)
    assert not job.applied and job.counts()["error"] == 1
    assert result_rows(job)[0] == (2, "error", "user_suppressed")
    assert not EndUser.objects.filter(user_id__in=["gone", "fresh"]).exists()

    Suppression.objects.filter(user_id="gone").delete()
    job = run_import(tenant.workspace, data)
    assert job.applied and job.counts()["created"] == 2


def test_suppressed_user_ids_are_refused_in_a_chunk_of_many_user_ids(tenant):
    """Above 100 userIds the suppression lookup is one array parameter (PostgreSQL): the
    same rows are refused, quotes and backslashes included."""
    odd = 'quo"te\\slash'
    for user_id in ("gone", odd):
        gone = identify(tenant.workspace, user_id, name="Gone", at=T0)
        services.delete_user(workspace=tenant.workspace, user_pk=gone.pk)
    rows = [{"user_id": f"u{i}"} for i in range(150)]
    rows[40] = {"user_id": "gone"}
    rows[120] = {"user_id": odd}
    job = run_import(tenant.workspace, csv_bytes(rows))
    errors = [row for row in result_rows(job) if row[1] == "error"]
    assert errors == [(42, "error", "user_suppressed"), (122, "error", "user_suppressed")]
    assert services.suppressed_user_ids(workspace=tenant.workspace, user_ids={r["user_id"] for r in rows}) == {
        "gone",
        odd,
    }


@pytest.mark.parametrize("suppressions", [3, 400], ids=["fewer than the userIds", "more than the userIds"])
def test_many_user_ids_are_matched_against_the_workspaces_suppressions_only(tenant, other_tenant, suppressions):
    """150 userIds against a workspace with few suppressions (read whole, matched in Python)
    or with more than 150 (probed by key, PostgreSQL): the same answer, and never another
    workspace's suppressions."""
    from users.models import Suppression

    gone = [f"gone-{i}" for i in range(suppressions)]
    for workspace, names in ((tenant.workspace, gone), (other_tenant.workspace, ["u7", "u8", *gone])):
        Suppression.objects.bulk_create([Suppression(workspace=workspace, user_id=name) for name in names])
    asked = {f"u{i}" for i in range(148)} | {"gone-1", "gone-2"}

    assert services.suppressed_user_ids(workspace=tenant.workspace, user_ids=asked) == {"gone-1", "gone-2"}
    assert services.suppressed_user_ids(workspace=other_tenant.workspace, user_ids=asked) == {
        "u7",
        "u8",
        "gone-1",
        "gone-2",
    }


def test_the_import_gives_back_the_garbage_collectors_frozen_objects_even_when_it_fails(tenant, monkeypatch):
    import gc

    from users import csv_import

    before = gc.get_freeze_count()
    run_import(tenant.workspace, csv_bytes([{"user_id": f"u{i}"} for i in range(10)]))
    assert gc.get_freeze_count() == before

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(csv_import, "apply_profile_rows", broken)
    with pytest.raises(RuntimeError):
        run_import(tenant.workspace, csv_bytes([{"user_id": "u1"}]))
    assert gc.get_freeze_count() == before


def test_a_rolled_back_import_leaves_alone_a_job_another_runner_finished_meanwhile(tenant, monkeypatch):
    """A dry run (or an import with a row error) is rolled back, then the job's ``done`` is
    written in a second transaction under the job's lock, and only if the job is still
    running: a runner of the same job that finished it in between (a redelivery) is kept."""
    real = csv_import._still_running
    looks = []

    def still_running(job):
        looks.append(job.pk)
        if len(looks) == 2:  # after the rollback, before the second transaction takes the lock
            ImportJob.objects.filter(pk=job.pk).update(status=ImportStatus.DONE, applied=True, created=7)
        return real(job)

    monkeypatch.setattr(csv_import, "_still_running", still_running)
    job = run_import(tenant.workspace, csv_bytes([{"user_id": "new", "email": "new@example.com"}]), dry_run=True)

    assert len(looks) == 2
    assert (job.status, job.applied, job.created) == (ImportStatus.DONE, True, 7)
    assert not EndUser.objects.filter(workspace=tenant.workspace).exists()
