"""CSV export of a workspace's users.

Service (what the dashboard, the REST API and ``manage.py export_users`` call):

    export_users_csv(*, workspace: Workspace, chunk_size: int = EXPORT_CHUNK_ROWS) -> Iterator[str]
        The whole file as text pieces: the header line, then one piece per chunk of users.
        Encode each piece as UTF-8 (no BOM). Oldest user first.

    export_row_count(*, workspace: Workspace) -> int
        How many data rows the export will have (for progress bars).

Memory stays flat whatever the number of users: users are read a chunk at a time by keyset
pagination on (created_at, id) — the workspace's existing index — each chunk a short query
of its own, so no long transaction or server-side cursor is held while a slow client reads.
Flags come from the same query (``has_same_email``, an EXISTS per row on the email index),
never a query per user. Rows are written by the ``csv`` module (RFC 4180 quoting, CRLF) with
text cells neutralised against formula injection (see ``users.csv_format``).

On PostgreSQL each chunk is one ``COPY (SELECT …) TO STDOUT (FORMAT csv)``: the formula
quote is done in SQL, the CSV quoting by COPY (the csv module's rules), and Python only
ends each line with CRLF. Its output is the Python path's, byte for byte (tests/test_csv_export.py
compares the two on awkward values).
"""

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime

from django.db import connection
from django.db.models import F, Func, TextField
from django.db.models.fields.tuple_lookups import Tuple, TupleGreaterThan
from django.db.models.functions import Cast

from kana.copy_rows import copy_out_csv, stream_copy_out_csv
from kana.models import Workspace

from .csv_format import COLUMNS, FLAG_SEPARATOR, FORMULA_TRIGGERS, escape_cell
from .models import EndUser, UserFlag
from .selectors import users_with_flags

# Users per query. A chunk's rows and its CSV text are in memory at once: ~5,000 rows is
# about 1 MB, big enough that the per-query cost is noise.
EXPORT_CHUNK_ROWS = 5000

_FIELDS = ("id", "user_id", "name", "email", "billing_id", "billing_provider", "created_text", "has_same_email")
_NO_BILLING = UserFlag.NO_BILLING_ID.value
_BOTH_FLAGS = FLAG_SEPARATOR.join([UserFlag.NO_BILLING_ID.value, UserFlag.SAME_EMAIL.value])
_SAME_EMAIL = UserFlag.SAME_EMAIL.value


def export_row_count(*, workspace: Workspace) -> int:
    return EndUser.objects.for_workspace(workspace).count()


def export_users_csv(*, workspace: Workspace, chunk_size: int = EXPORT_CHUNK_ROWS) -> Iterator[str]:
    """Every user of the workspace as CSV text, header first, a piece per chunk of users."""
    if connection.vendor == "postgresql":
        return _export_with_copy(workspace, chunk_size)
    return _export_in_python(workspace, chunk_size)


def _formula_safe(expression: str) -> str:
    """SQL: ``users.csv_format.escape_cell``, a quote in front of ^'*[=+-@ TAB CR].

    Every trigger sorts below ``A``, so a cell whose first byte is ``A`` or above (letters,
    ``_``, any non-ASCII character: most cells) is passed on after one byte comparison
    (collation "C" whatever the database's: memcmp, not the locale's strcoll); the others
    get the first-character test, and only those starting with a trigger the regex, as in
    Python. NULL stays NULL (no branch is true for it)."""
    return (
        f"CASE WHEN {expression} COLLATE \"C\" >= 'A' THEN {expression} "
        f"WHEN left({expression}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r', '''') "
        f"AND {expression} ~ '^''*[=+@\\t\\r-]' THEN '''' || {expression} ELSE {expression} END"
    )


def _cell(expression: str) -> str:
    # COPY's CSV writes an empty string as "" and NULL as nothing; the csv module writes nothing.
    return f"NULLIF({expression}, '')"


_FLAGS_SQL = (
    f"CASE WHEN u.billing_id = '' THEN CASE WHEN u.has_same_email THEN '{_BOTH_FLAGS}' ELSE '{_NO_BILLING}' END "
    f"WHEN u.has_same_email THEN '{_SAME_EMAIL}' END"
)
# The cells of one user, in the order of COLUMNS. COPY's CSV output quotes them as the csv
# module does: a cell holding a comma, a double quote, CR or LF, with quotes doubled.
_CELLS_SQL = ", ".join(
    [
        "u.id",
        _cell(_formula_safe("u.user_id")),
        _cell(_formula_safe("u.name")),
        _cell(_formula_safe("u.email")),
        _cell(_formula_safe("u.billing_id")),
        _cell("u.billing_provider"),
        "u.created_text",
        _FLAGS_SQL,
    ]
)
_COPY_FIELDS = (
    "id",
    "user_id",
    "name",
    "email",
    "billing_id",
    "billing_provider",
    "created_at",
    "created_text",
    "has_same_email",
)


def _export_with_copy(workspace: Workspace, chunk_size: int) -> Iterator[str]:
    """PostgreSQL: one ``COPY (SELECT …) TO STDOUT (FORMAT csv)`` per chunk, keyset-paginated
    like the Python path; Python only ends each line with CRLF, as the csv module does."""
    yield ",".join(COLUMNS) + "\r\n"
    after = None
    while True:
        users = users_with_flags(workspace)
        if after is not None:
            users = users.filter(TupleGreaterThan(Tuple(F("created_at"), F("id")), after))
        users = users.annotate(created_text=_IsoUtc("created_at")).order_by("created_at", "id")
        inner, params = users.values_list(*_COPY_FIELDS)[:chunk_size].query.sql_with_params()
        rows = copy_out_csv(f"SELECT {_CELLS_SQL} FROM ({inner}) AS u ORDER BY u.created_at, u.id", params)
        if not rows:
            return
        # One row per COPY message, ending in LF (a line break inside a quoted cell stays as is).
        yield _crlf_lines(rows)
        if len(rows) < chunk_size:
            return
        # The key of the next chunk: kana_id leads the line, created_at and flags end it (never quoted).
        last = rows[-1].decode()
        created_text = last.rstrip("\n").rsplit(",", 2)[1]
        after = (datetime.fromisoformat(created_text), int(last.split(",", 1)[0]))


# The streamed export sends the workspace's shared email keys back as one array constant
# while their text stays below this (the literal is held once here and once by psycopg);
# beyond, its statement groups them itself. 4 MB: ~150,000 keys of a usual length.
SHARED_KEYS_IN_ARRAY_MAX_BYTES = 4 << 20


def export_users_csv_file(*, workspace: Workspace, chunk_size: int = EXPORT_CHUNK_ROWS) -> Iterator[str]:
    """``export_users_csv`` for a local writer (``manage.py export_users``), the same bytes.

    On PostgreSQL the whole export is one ``COPY … TO STDOUT (FORMAT csv)`` read as a stream,
    no query per chunk. The email keys several users share are read first, by one grouped
    scan of the workspace's email index, and go back into the COPY as one array constant:
    PostgreSQL hashes a constant array, so the flag costs a hash probe per user, and the
    users are read in the order of the (workspace, created_at, id) index, with no sort (at
    1M users the join and sort this replaces spilled to disk). The statement and the
    connection stay busy until the last row is read, which is why the HTTP edges, whose
    client may be slow, use the chunked ``export_users_csv``.
    """
    if connection.vendor != "postgresql":
        yield from _export_in_python(workspace, chunk_size)
        return
    yield ",".join(COLUMNS) + "\r\n"
    shared_keys = _shared_email_keys(workspace)
    if shared_keys is None:
        sql, params = _one_statement_sql(), [workspace.pk, workspace.pk]
    else:
        sql, params = _one_statement_with_keys_sql(), [shared_keys, workspace.pk]
    pending: list[bytes] = []
    for row in stream_copy_out_csv(sql, params):
        pending.append(row)
        if len(pending) == chunk_size:
            yield _crlf_lines(pending)
            pending = []
    if pending:
        yield _crlf_lines(pending)


def _shared_email_keys(workspace: Workspace) -> str | None:
    """The email keys more than one of the workspace's users have, as a PostgreSQL array
    literal (what ``array_out`` writes, read back exactly by ``::text[]``); None when their
    text is over SHARED_KEYS_IN_ARRAY_MAX_BYTES (counted with a quote pair and a comma each)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT CASE WHEN coalesce(sum(octet_length(email_key) + 3), 0) <= %s "
            "THEN coalesce(array_agg(email_key)::text, '{}') END "
            f"FROM ({_SHARED_KEYS_SQL}) AS shared",
            [SHARED_KEYS_IN_ARRAY_MAX_BYTES, workspace.pk],
        )
        return cursor.fetchone()[0]


def _crlf_lines(rows: list) -> str:
    """COPY's rows (each ending in LF) as the csv module writes them: lines ending in CRLF.

    A line feed inside a cell stays as it is; such a cell is quoted, so a chunk with no
    double quote at all has only line ends, and one ``replace`` converts them all (no
    copy or slice per row)."""
    data = b"".join(rows)
    if b'"' not in data:
        return data.replace(b"\n", b"\r\n").decode()
    return b"\r\n".join([bytes(row)[:-1] for row in rows]).decode() + "\r\n"


_SHARED_KEYS_SQL = (
    f"SELECT email_key FROM {EndUser._meta.db_table} "
    "WHERE workspace_id = %s AND email_key <> '' GROUP BY email_key HAVING count(*) > 1"
)


def _one_statement_with_keys_sql() -> str:
    # Parameters: the shared keys' array literal, the workspace. COPY's parameters are bound
    # client-side, so the array is a constant when planned: hashed, and the index gives the order.
    return f"""
SELECT {_CELLS_SQL}
FROM (
    SELECT e.id, e.user_id, e.name, e.email, e.billing_id, e.billing_provider, e.created_at,
        {_IsoUtc.template % {"expressions": "e.created_at"}} AS created_text,
        e.email_key = ANY(%s::text[]) AS has_same_email
    FROM {EndUser._meta.db_table} e
    WHERE e.workspace_id = %s
) AS u
ORDER BY u.created_at, u.id
"""


def _one_statement_sql() -> str:
    # Too many shared keys for one constant: they are grouped here, then joined (and sorted).
    return f"""
SELECT {_CELLS_SQL}
FROM (
    SELECT e.id, e.user_id, e.name, e.email, e.billing_id, e.billing_provider, e.created_at,
        {_IsoUtc.template % {"expressions": "e.created_at"}} AS created_text,
        shared.email_key IS NOT NULL AS has_same_email
    FROM {EndUser._meta.db_table} e
    LEFT JOIN ({_SHARED_KEYS_SQL}) shared ON shared.email_key = e.email_key
    WHERE e.workspace_id = %s
) AS u
ORDER BY u.created_at, u.id
"""


def _export_in_python(workspace: Workspace, chunk_size: int) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    yield _take(buffer)
    after = None
    iso_in_sql = connection.vendor == "postgresql"
    while True:
        users = users_with_flags(workspace)
        if after is not None:
            users = users.filter(TupleGreaterThan(Tuple(F("created_at"), F("id")), after))
        # created_at as text: Django's timestamptz loader is pure Python and took 40% of the time.
        # PostgreSQL writes it as the file has it (datetime.isoformat() took another 15%).
        users = users.annotate(created_text=_IsoUtc("created_at") if iso_in_sql else Cast("created_at", TextField()))
        rows = list(users.order_by("created_at", "id").values_list(*_FIELDS)[:chunk_size])
        if not rows:
            return
        converted = _csv_rows(rows, iso_in_sql)
        writer.writerows(converted)
        yield _take(buffer)
        last = converted[-1]
        after = (datetime.fromisoformat(last[6]), last[0])
        if len(rows) < chunk_size:
            return


def _timestamp(text: str) -> str:
    # PostgreSQL: "2024-01-01 10:00:00.5+00" (UTC session); SQLite: naive UTC text.
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


class _IsoUtc(Func):
    """PostgreSQL: a timestamptz as ``datetime.isoformat()`` writes it in UTC
    (``2024-01-01T10:00:00+00:00``, ``2024-01-01T10:00:00.500000+00:00``)."""

    output_field = TextField()
    # One to_char with the microseconds, dropped when they are zero as isoformat() does
    # (".000000" can appear nowhere else in the text).
    template = (
        "replace(to_char(%(expressions)s AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), '.000000', '')"
        " || '+00:00'"
    )


def _csv_rows(rows: list[tuple], iso_in_sql: bool) -> list[tuple]:
    # One loop with its names bound locally: a function call per row and cell was a fifth of the time.
    escape, triggers, timestamp = escape_cell, FORMULA_TRIGGERS, _timestamp
    converted = []
    append = converted.append
    for pk, user_id, name, email, billing_id, provider, created_text, same_email in rows:
        if billing_id:
            flags = _SAME_EMAIL if same_email else ""
            if billing_id[0] in triggers:
                billing_id = escape(billing_id)
        else:
            flags = _BOTH_FLAGS if same_email else _NO_BILLING
        append(
            (
                pk,
                (escape(user_id) if user_id[0] in triggers else user_id) if user_id else "",
                escape(name) if name and name[0] in triggers else name,
                escape(email) if email and email[0] in triggers else email,
                billing_id,
                provider,
                created_text if iso_in_sql else timestamp(created_text),
                flags,
            )
        )
    return converted


def _take(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text
