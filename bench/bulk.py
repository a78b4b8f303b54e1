"""Fast data loading with COPY: events and users in the shapes Kana stores them.

Rows are rendered once as COPY text (no JSON encoding per row: a template is filled in),
so loading a million events is bounded by PostgreSQL, not by Python.
"""

import io
import time
from collections.abc import Iterable

import psycopg

EVENT_COLUMNS = (
    "workspace_id, message_id, type, name, user_id, external_user_id, payload, occurred_at, received_at, "
    "status, unmapped_reason, warnings"
)
USER_COLUMNS = (
    "workspace_id, user_id, name, name_set_at, email, email_key, email_set_at, billing_id, billing_provider, "
    "billing_set_at, audiences, created_at, updated_at"
)
ROWS_PER_CHUNK = 20_000
TIME = "2026-01-15 10:00:00+00"

# A track event as the app stores it; %-placeholders: external userId, messageId, a number.
_EVENT_PAYLOAD = (
    '{"type":"track","event":"%(name)s","userId":"%(uid)s","messageId":"%(mid)s",'
    '"timestamp":"2026-01-15T10:00:00.000Z","properties":{"plan":{"tier":"pro"},"format":"pdf","pages":%(n)d},'
    '"context":{"library":{"name":"analytics-node","version":"6.2.0"}}}'
)
_EVENT_ROW = (
    "%(ws)d\t%(mid)s\ttrack\t%(name)s\t%(user_pk)d\t%(uid)s\t"
    + _EVENT_PAYLOAD
    + "\t"
    + TIME
    + "\t"
    + TIME
    # unmapped, as if no rule existed when the events arrived
    + "\tunmapped\tno_matching_rule\t[]\n"
)


def unmapped_event_chunks(
    *, workspace_id: int, prefix: str, count: int, users: list[tuple[int, str]], name: str = "Report Exported"
) -> list[bytes]:
    """``count`` unmapped ``name`` events spread over ``users`` (pk, userId)."""
    chunks = []
    for start in range(0, count, ROWS_PER_CHUNK):
        buffer = io.StringIO()
        for i in range(start, min(count, start + ROWS_PER_CHUNK)):
            user_pk, uid = users[i % len(users)]
            row = {"ws": workspace_id, "mid": f"{prefix}-{i}", "user_pk": user_pk, "uid": uid, "n": i % 50}
            buffer.write(_EVENT_ROW % {**row, "name": name})
        chunks.append(buffer.getvalue().encode())
    return chunks


def copy_chunks(conn: psycopg.Connection, table: str, columns: str, chunks: Iterable[bytes]) -> float:
    """COPY the chunks into ``table`` and commit; returns the seconds it took."""
    started = time.perf_counter()
    with conn.cursor() as cursor:
        with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for chunk in chunks:
                copy.write(chunk)
    conn.commit()
    return time.perf_counter() - started


def _text(value: str | None) -> str:
    return "\\N" if value is None else value


def user_chunks(rows: Iterable[tuple[int, str | None, str, str, str]]) -> Iterable[bytes]:
    """Users from (workspace_id, userId or None, name, email, billing_id) tuples."""
    buffer, n = io.StringIO(), 0
    for workspace_id, user_id, name, email, billing_id in rows:
        provider = "stripe" if billing_id else ""
        set_at = TIME if email else "\\N"
        buffer.write(
            f"{workspace_id}\t{_text(user_id)}\t{name}\t{set_at}\t{email}\t{email.strip().lower()}\t{set_at}\t"
            f"{billing_id}\t{provider}\t{TIME if billing_id else chr(92) + 'N'}\t{{}}\t{TIME}\t{TIME}\n"
        )
        n += 1
        if n % ROWS_PER_CHUNK == 0:
            yield buffer.getvalue().encode()
            buffer = io.StringIO()
    if buffer.tell():
        yield buffer.getvalue().encode()


def load_users(conn: psycopg.Connection, workspace_id: int, rows: Iterable[tuple]) -> float:
    """COPY users, then give each with a userId its identity row (set-based). Seconds taken."""
    started = time.perf_counter()
    copy_chunks(conn, "users_enduser", USER_COLUMNS, user_chunks(rows))
    conn.execute(
        "INSERT INTO users_useridentity (workspace_id, user_id, external_id, created_at) "
        "SELECT workspace_id, id, user_id, created_at FROM users_enduser "
        "WHERE workspace_id = %s AND user_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM users_useridentity i WHERE i.user_id = users_enduser.id)",
        [workspace_id],
    )
    conn.commit()
    return time.perf_counter() - started


def user_keys(conn: psycopg.Connection, workspace_id: int) -> list[tuple[int, str]]:
    return conn.execute(
        "SELECT id, user_id FROM users_enduser WHERE workspace_id = %s AND user_id IS NOT NULL ORDER BY id",
        [workspace_id],
    ).fetchall()


def vacuum_analyze(conn: psycopg.Connection, table: str) -> None:
    """What autovacuum would do to freshly loaded rows, done now so no scenario pays it."""
    previous = conn.autocommit
    conn.commit()
    conn.autocommit = True
    try:
        conn.execute(f"VACUUM (ANALYZE) {table}")
    finally:
        conn.autocommit = previous
