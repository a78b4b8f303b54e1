"""CSV export: every user of the workspace, streamed, flagged, spreadsheet-safe."""

import csv
import io
from datetime import UTC, datetime, timedelta, timezone

import pytest

from users.csv_export import export_users_csv
from users.csv_format import escape_cell, unescape_cell
from users.models import EndUser

from .conftest import requires_postgres
from .csv_helpers import T0, bare, export_rows, export_text, identify

pytestmark = pytest.mark.django_db


def test_it_exports_every_user_oldest_first_with_flags(tenant):
    ann = identify(tenant.workspace, "u1", name="Ann", email="ann@example.com", billing_id="cus_1", at=T0)
    bob = identify(tenant.workspace, "u2", name="Bob", email="Shared@example.com", at=T0)
    carl = bare(tenant.workspace, email="carl@example.com", billing_id="AB-12", at=T0)
    dee = identify(tenant.workspace, "u4", email="shared@example.com ", billing_id="cus_4", at=T0)

    text = export_text(tenant.workspace)

    assert text.startswith("kana_id,user_id,name,email,billing_id,billing_provider,created_at,flags\r\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["kana_id"], r["user_id"], r["flags"]) for r in rows] == [
        (str(ann.pk), "u1", ""),
        (str(bob.pk), "u2", "no_billing_id;same_email"),
        (str(carl.pk), "", ""),
        (str(dee.pk), "u4", "same_email"),
    ]
    assert rows[2]["billing_provider"] == "chargebee" and rows[0]["billing_provider"] == "stripe"
    assert rows[0]["created_at"] == ann.created_at.isoformat()


def test_it_never_shows_another_workspaces_users(tenant, other_tenant):
    identify(tenant.workspace, "mine", email="x@example.com")
    identify(other_tenant.workspace, "theirs", email="x@example.com")
    rows = export_rows(tenant.workspace)
    assert [(r["user_id"], r["flags"]) for r in rows] == [("mine", "no_billing_id")]  # not same_email either


def test_it_streams_a_chunk_at_a_time_with_a_fixed_number_of_queries(tenant, django_assert_max_num_queries):
    for i in range(25):
        identify(tenant.workspace, f"u{i}", email=f"same{i % 2}@example.com")
    pieces = export_users_csv(workspace=tenant.workspace, chunk_size=10)
    with django_assert_max_num_queries(3):  # 25 users in chunks of 10: three queries, no query per user
        chunks = list(pieces)
    assert len(chunks) == 4  # header + three chunks
    rows = list(csv.DictReader(io.StringIO("".join(chunks))))
    assert [r["user_id"] for r in rows] == [f"u{i}" for i in range(25)]
    assert {r["flags"] for r in rows} == {"no_billing_id;same_email"}


def test_an_empty_workspace_exports_the_header(tenant):
    header = "kana_id,user_id,name,email,billing_id,billing_provider,created_at,flags\r\n"
    assert export_text(tenant.workspace) == header


@pytest.mark.parametrize(
    "value, exported",
    [
        ("=1+2", "'=1+2"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("'=x", "''=x"),
        ("''-x", "'''-x"),
        ("'Tis", "'Tis"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_cells_are_neutralised_and_restored_exactly(value, exported):
    assert escape_cell(value) == exported
    assert unescape_cell(exported) == value


def test_created_at_is_written_as_isoformat_with_and_without_microseconds(tenant):
    """PostgreSQL formats created_at in SQL: it must match ``datetime.isoformat()`` exactly."""
    moments = [
        datetime(2020, 1, 1, 12, 0, 0, tzinfo=UTC),
        datetime(2020, 1, 1, 12, 0, 0, 500000, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
        datetime(2024, 2, 29, 7, 5, 9, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    ]
    users = [identify(tenant.workspace, f"t{i}") for i in range(len(moments))]
    for user, moment in zip(users, moments, strict=True):
        EndUser.objects.filter(pk=user.pk).update(created_at=moment)

    exported = {row["kana_id"]: row["created_at"] for row in export_rows(tenant.workspace)}

    assert exported == {str(u.pk): m.astimezone(UTC).isoformat() for u, m in zip(users, moments, strict=True)}


AWKWARD = [
    "plain",
    "",
    "comma, inside",
    'a "quoted" word',
    '"',
    "line\nbreak",
    "carriage\rreturn",
    "crlf\r\nhere",
    "tab\there",
    "back\\slash \\n not a newline",
    "\\.",
    "=1+2",
    "+1",
    "-1,2",
    "@SUM(A1)",
    "\tlead",
    "\rlead",
    "'=x",
    "''-x",
    "'Tis",
    "ünïcödé 名前 🚀",
    "\x0bvertical\x0cfeed\x08back",
    " spaced ",
    # Around the SQL fast path (a first byte of "A" or above is never a trigger).
    "A",
    "@",
    "?=x",
    "9-9",
    "_=x",
    "`=x",
    "é=x",
    "Z",
]


@requires_postgres  # COPY is PostgreSQL's; SQLite has only the Python path
@pytest.mark.parametrize("chunk_size", [1, 7, 5000])
def test_the_copy_export_is_the_python_export_byte_for_byte(tenant, chunk_size):
    from users.csv_export import _export_in_python, _export_with_copy, export_users_csv_file

    for i, value in enumerate(AWKWARD):
        EndUser.objects.create(
            workspace=tenant.workspace,
            user_id=None if i % 5 == 4 else f"{value}-{i}",
            name=value,
            email=AWKWARD[-1 - i],
            email_key="same@example.com" if i % 3 == 0 else f"k{i}",
            billing_id=value[:50] if i % 2 else "",
            billing_provider="stripe" if i % 2 else "",
            # Equal timestamps in pairs: the keyset must order and resume on the id too.
            created_at=T0 + timedelta(microseconds=(i // 2) * 250_000),
        )
    in_python = "".join(_export_in_python(tenant.workspace, chunk_size))
    with_copy = "".join(_export_with_copy(tenant.workspace, chunk_size))
    assert with_copy == in_python
    assert "".join(export_users_csv_file(workspace=tenant.workspace, chunk_size=chunk_size)) == in_python
    assert len(list(csv.reader(io.StringIO(with_copy)))) == len(AWKWARD) + 1


def test_copy_rows_become_crlf_lines_with_line_feeds_inside_cells_kept():
    from users.csv_export import _crlf_lines

    assert _crlf_lines([b"1,a\n", b"2,b\n"]) == "1,a\r\n2,b\r\n"
    # A quoted cell keeps its own line feed; only the line's end becomes CRLF.
    assert _crlf_lines([b'1,"a\nb"\n', memoryview(b"2,c\n")]) == '1,"a\nb"\r\n2,c\r\n'


@requires_postgres
@pytest.mark.parametrize("keys_in_array_max", [4 << 20, 0])
def test_the_streamed_export_flags_shared_keys_the_same_with_or_without_the_key_array(
    tenant, keys_in_array_max, monkeypatch
):
    """The command's statement gets the shared email keys as one array literal (or, beyond
    SHARED_KEYS_IN_ARRAY_MAX_BYTES, groups them itself): keys needing quotes in an array literal
    must come back exactly, and both statements must write the Python path's bytes."""
    from users import csv_export
    from users.csv_export import _export_in_python, export_users_csv_file

    monkeypatch.setattr(csv_export, "SHARED_KEYS_IN_ARRAY_MAX_BYTES", keys_in_array_max)
    keys = ['a "q"@x', "b,c@x", "{d}@x", "e\\f@x", "g h@x", "NULL", "ü@x", "lone@x", ""]
    for i, key in enumerate(keys + keys[:-2]):  # all but the last two shared by two users
        EndUser.objects.create(
            workspace=tenant.workspace,
            user_id=f"u{i}",
            email=key,
            email_key=key,
            billing_id="cus_1" if i % 2 else "",
            created_at=T0 + timedelta(seconds=i),
        )
    in_python = "".join(_export_in_python(tenant.workspace, 5000))
    assert "".join(export_users_csv_file(workspace=tenant.workspace)) == in_python
    flags = {row["user_id"]: row["flags"] for row in csv.DictReader(io.StringIO(in_python))}
    assert flags["u0"] == "no_billing_id;same_email" and flags["u1"] == "same_email"
    assert flags["u7"] == "" and flags["u8"] == "no_billing_id"  # "lone@x" and "" are not shared
    assert flags["u9"] == "same_email" and flags["u13"] == "same_email"  # the second holders
