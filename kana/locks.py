"""Transaction-scoped locks that order concurrent writers.

PostgreSQL: advisory locks released at commit. SQLite needs none: the embedded database runs
every transaction with BEGIN IMMEDIATE, so writers are already serialised.
"""

import hashlib

from django.db import connection

from kana.db import kept_cursor, on_postgres, pipelined

# Namespaces for two-key advisory locks (PostgreSQL keeps the two-key space apart from the
# one-key space, so these never collide with the identity-key locks below).
RULES_LOCK_NAMESPACE = 1
JOBS_LOCK_NAMESPACE = 2


def _is_postgres() -> bool:
    return on_postgres()


def lock_rules_shared(workspace_id: int) -> int:
    """Taken by every ingest transaction that maps events: returns the rules version.

    Rule and feature creation take the same lock exclusively, so they wait for in-flight
    ingest transactions to commit, and ingest that starts afterwards waits for the rule to
    commit and then sees it.

    Two statements on purpose: under READ COMMITTED a statement reads with the snapshot taken
    when it started, so a version read in the same statement as a lock that had to wait
    would be the version from before the rule committed, and the event would be mapped with
    the old rules while falling after the new rule's reprocessing range: counted zero times.
    """
    with connection.cursor() as cursor:
        if _is_postgres():
            cursor.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", [RULES_LOCK_NAMESPACE, workspace_id])
        cursor.execute("SELECT rules_version FROM kana_workspace WHERE id = %s", [workspace_id])
        return cursor.fetchone()[0]


def lock_rules_exclusive(workspace_id: int) -> None:
    if _is_postgres():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [RULES_LOCK_NAMESPACE, workspace_id])


def lock_workspace_jobs(workspace_id: int) -> None:
    """Serialises claims of one workspace's background jobs (reprocessing, imports), so a
    per-workspace cap on running jobs is exact: count, then claim, under this lock."""
    if _is_postgres():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [JOBS_LOCK_NAMESPACE, workspace_id])


def _key_to_bigint(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def lock_keys(keys: list[str]) -> None:
    """Exclusive locks on arbitrary string keys, taken in sorted order to avoid deadlocks.

    Used by identity resolution to serialise messages naming the same userId or email.
    """
    if not keys or not _is_postgres():
        return
    sql, params = lock_keys_statement(keys)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def lock_keys_statement(keys: list[str]) -> tuple[str, dict]:
    """``lock_keys``'s statement (PostgreSQL), with named parameters, for a caller that sends
    it in one message with other statements."""
    expressions, params = lock_keys_expressions(keys)
    return "SELECT " + expressions, params


def lock_keys_expressions(keys: list[str]) -> tuple[str, dict]:
    """``pg_advisory_xact_lock(%(lock0)s), …`` in sorted key order, with their parameters: for
    a caller that takes the locks inside a statement of its own (e.g. only in some CASE)."""
    ids = sorted({_key_to_bigint(k) for k in keys})
    params = {f"lock{n}": lock_id for n, lock_id in enumerate(ids)}
    # Target-list items (and a CASE's arguments) are evaluated left to right: sorted order.
    return ", ".join(f"pg_advisory_xact_lock(%({name})s)" for name in params), params


def lock_rules_shared_and_read(
    workspace_id: int, sql: str, params: list, *, begin: bool = False
) -> tuple[int, list[tuple]]:
    """``lock_rules_shared`` followed by one more read (``sql``), in a single round trip.

    The hot path of ingest: the statements go in one message, and PostgreSQL runs them in
    order, each with its own snapshot under READ COMMITTED, so the version and the read see
    everything committed before the lock was granted, exactly as separate statements would.
    Returns the rules version and the read's rows.

    ``begin`` (PostgreSQL, inside ``kana.db.pipelined.transaction``): the same message also
    opens the transaction, so the statements and their snapshots are those of ``atomic``.
    """
    if not _is_postgres():
        version = lock_rules_shared(workspace_id)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return version, cursor.fetchall()
    with connection.cursor() as cursor:
        lock = "SELECT pg_advisory_xact_lock_shared(%s, %s); SELECT rules_version FROM kana_workspace WHERE id = %s; "
        cursor.execute(
            (pipelined.BEGIN if begin else "") + lock + sql, [RULES_LOCK_NAMESPACE, workspace_id, workspace_id, *params]
        )
        if begin:
            cursor.nextset()  # past BEGIN's result
        cursor.nextset()
        version = cursor.fetchone()[0]
        cursor.nextset()
        return version, cursor.fetchall()


def lock_rules_shared_then_read(workspace_id: int, read: kept_cursor.Statement, *, begin: bool = False) -> list[tuple]:
    """``lock_rules_shared_and_read`` for a read that reads the rules version itself: the
    lock's statement, then ``read``, in a single round trip; returns the read's rows.

    One statement fewer than ``lock_rules_shared_and_read`` (a single track's first round
    trip: its parsing, planning and execution were about a fifth of that round trip's
    PostgreSQL time, docs/performance-history.md "Round 8: s1trig"). The read must be a statement of
    its own, after the lock's (as here): its snapshot, and so the version it reads, then
    sees everything committed before the lock was granted (``lock_rules_shared``).
    """
    if not _is_postgres():
        lock_rules_shared(workspace_id)
        with connection.cursor() as cursor:
            cursor.execute(read.sql, read.params)
            return cursor.fetchall()
    lock = kept_cursor.Statement("SELECT pg_advisory_xact_lock_shared(%s, %s)", [RULES_LOCK_NAMESPACE, workspace_id])
    # A single track's first round trip: on the kept cursor (kana.db.kept_cursor), a prepared
    # read's values bound server-side. The read's result follows BEGIN's (if sent) and the lock's.
    statements = [kept_cursor.Statement("BEGIN"), lock, read] if begin else [lock, read]
    return kept_cursor.message_rows(statements, result=len(statements) - 1)


def lock_rules_shared_then_run(workspace_id: int, statement: kept_cursor.Statement) -> list[tuple]:
    """The shared rules lock, then ``statement`` (named parameters), in one round trip and a
    transaction of their own (PostgreSQL, outside any transaction:
    ``kana.db.pipelined.available``); returns the statement's rows.

    Sent as one pipeline without ``BEGIN``: PostgreSQL runs a pipeline's statements up to its
    Sync in one implicit transaction, committed at the Sync (rolled back if one fails), each
    with its own snapshot under READ COMMITTED. So the lock is held until the statement's
    work is committed, and the statement reads what was committed before the lock was
    granted: the order and snapshots of ``BEGIN``, lock, statement, ``COMMIT``, without
    executing ``BEGIN`` and ``COMMIT`` as statements (a single track of a known user:
    ``features.ledger.record_known_user_usage``)."""
    # Named values, in one dict for both (the one message of texts it may be sent as instead
    # takes a single set of values).
    params = {**statement.params, "rules_lock_namespace": RULES_LOCK_NAMESPACE, "rules_lock_workspace": workspace_id}
    lock = kept_cursor.Statement(_RULES_LOCK_SHARED_NAMED, params)
    return kept_cursor.message_rows([lock, statement._replace(params=params)], result=1)


_RULES_LOCK_SHARED_NAMED = "SELECT pg_advisory_xact_lock_shared(%(rules_lock_namespace)s, %(rules_lock_workspace)s)"


def lock_keys_and_read(
    keys: list[str], reads: list[kept_cursor.Statement], *, begin: bool = False, prepare: bool = False
) -> list[list[tuple]]:
    """``lock_keys`` followed by ``reads``, in one round trip; returns each read's rows.

    PostgreSQL runs the statements of one message in order, each with its own snapshot under
    READ COMMITTED: every read sees what was committed before the locks were granted, as if
    sent one by one. ``begin`` (inside ``kana.db.pipelined.transaction``): the same message
    opens the transaction. Elsewhere the locks are not needed and the reads run one by one.
    ``prepare``: the locks' statement is a prepared one (``kana.db.prepared``; one shape per
    number of keys), for a caller that prepares its reads too and re-runs its transaction
    when ``prepared.is_missing`` its error (a ``PREPARE``, when the connection lacks the
    statement, goes first in a round trip of its own). The round trip is a pipeline on the
    kept cursor (``kana.db.kept_cursor.message_results``): the prepared statements' values
    bound server-side (an identify's first round trip: formatting them into ``EXECUTE``
    texts was the largest part of its app CPU, docs/performance-history.md "Round 15: s2app").
    """
    if not _is_postgres():
        return pipelined.execute_all([(read.sql, read.params) for read in reads])
    ids = sorted({_key_to_bigint(k) for k in keys})
    statements = [kept_cursor.Statement("BEGIN")] if begin else []
    if ids:
        # Target-list items are evaluated left to right: the locks are taken in sorted order.
        lock_sql = "SELECT " + ", ".join(["pg_advisory_xact_lock(%s)"] * len(ids))
        statements.append(kept_cursor.Statement(lock_sql, ids, prepare=prepare))
    results = kept_cursor.message_results([*statements, *reads])
    return results[len(statements) :]
