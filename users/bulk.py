"""Set-based reads and writes of users, for the identity engine (``users.identity``).

They bypass the ORM on PostgreSQL where it was measured to cost (CSV imports): Django's
timestamptz loader is pure Python (~10 µs a value, five per user), ``bulk_create`` prepares
every value (~100 µs a user and its identity), ``bulk_update`` builds a CASE expression per
row and field (milliseconds per row). Each keeps the ORM's semantics: the same rows, columns
and values. Errors come out as Django's, so the engine's retry understands them.
"""

import functools
import json
import operator
from collections.abc import Callable, Iterable
from datetime import datetime

from django.db import OperationalError, connection, models, transaction
from django.db.models import Q
from django.db.models.base import ModelState

from kana.copy_rows import copy_binary, next_ids
from kana.models import Workspace

from .models import EndUser, UserIdentity

# The profile columns the engine writes back for users it changed.
PROFILE_COLUMNS = [
    "user_id",
    "name",
    "name_set_at",
    "email",
    "email_key",
    "email_set_at",
    "billing_id",
    "billing_provider",
    "billing_set_at",
    "audiences",
    "updated_at",
]


def owners_of(workspace: Workspace, user_ids: set[str]) -> dict[str, int]:
    """userId -> user pk for those of ``user_ids`` the workspace knows."""
    if connection.vendor != "postgresql":
        identities = UserIdentity.objects.for_workspace(workspace).filter(external_id__in=user_ids)
        return dict(identities.values_list("external_id", "user_id"))
    with connection.cursor() as cursor:
        cursor.execute(*owners_of_sql(workspace, user_ids))
        return dict(cursor.fetchall())


def owners_of_sql(workspace: Workspace, user_ids: set[str]) -> tuple[str, list]:
    """``owners_of``'s statement (PostgreSQL): rows (userId, user pk)."""
    return _owner_probes(workspace, user_ids, "k.key, p.user_id")


def _per_key_probes(columns: str, probe: str) -> str:
    """``probe`` (a statement naming ``k.key``) run once per key of one text[] parameter.

    A plain ``key = ANY(keys)`` is planned on statistics that cannot see an import's own
    (uncommitted) users: it scans every user the import has created in the workspace, with
    the keys as a filter, so a large import is quadratic. Here each key is a LATERAL
    subquery (``OFFSET 0`` keeps it from being flattened into a join the planner could hash
    over the workspace): a nested loop of index probes by construction. The keys come as a
    sub-select, so that the planner takes them for 10 keys, not 1,000: 1,000 email probes
    costed on a fresh table's default selectivity pass ``jit_above_cost``, and compiling the
    statement cost ~60 ms a chunk. One array parameter: an IN list of 1,000 placeholders
    costs psycopg ~25 ms to parse.
    """
    return f"SELECT {columns} FROM unnest((SELECT %s::text[])) AS k(key) CROSS JOIN LATERAL ({probe} OFFSET 0) AS p"


def _owner_probes(workspace: Workspace, user_ids: set[str], columns: str) -> tuple[str, list]:
    """One probe of the unique (workspace, userId) index per userId, the only index whose
    columns the equality names: ``columns`` of the keys ``k`` and probes ``p``."""
    table = connection.ops.quote_name(UserIdentity._meta.db_table)
    probe = f"SELECT user_id FROM {table} WHERE workspace_id = %s AND external_id = k.key"
    return _per_key_probes(columns, probe), [text_array(user_ids), workspace.pk]


def int_array(values: Iterable[int]) -> str:
    """A PostgreSQL array literal (cast it: ``%s::bigint[]``); psycopg's list dumper costs ~3 µs an item."""
    return "{" + ",".join(str(int(value)) for value in values) + "}"


def text_array(values: Iterable[str]) -> str:
    """A PostgreSQL array literal of strings, each quoted (cast it: ``%s::text[]``)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def lock_users(workspace: Workspace, pks: set[int], email_keys: set[str]) -> list[EndUser]:
    """The workspace's users with these ids or email keys, row-locked in id order."""
    users = EndUser.objects.for_workspace(workspace)
    if connection.vendor != "postgresql":
        match = Q(pk__in=pks) | Q(email_key__in=email_keys) if email_keys else Q(pk__in=pks)
        return list(users.filter(match).order_by("pk").select_for_update())
    sql, params = lock_users_sql(workspace, pks, email_keys)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return users_from_rows(cursor.fetchall())


def lock_users_sql(
    workspace: Workspace, pks: set[int], email_keys: set[str], owners_of: set[str] = frozenset()
) -> tuple[str, list]:
    """``lock_users``'s statement (PostgreSQL), for a caller that sends it with others; its
    rows become users with ``users_from_rows``. ``owners_of``: also the users these userIds
    resolve to when the statement runs."""
    quote = connection.ops.quote_name
    users = quote(EndUser._meta.db_table)
    # Every read is a probe of an index that only it can use, so no statistics state (a
    # table never analysed, analysed empty over pages that exist, or analysed before this
    # import's users) can turn it into a scan of the workspace: the users by id through the
    # primary key; by email key, one LATERAL probe per key (``OFFSET 0``: not flattened
    # into a join) of the index that leads with the email key; by userId, the owners'
    # probes. ``workspace_id + 0`` keeps the indexes that lead with the workspace out of
    # every plan: with a workspace equality, ``enduser_ws_created_idx`` ties with the right
    # index whenever the statistics put the workspace at one row or less, and wins, each
    # probe then reading the whole workspace (15-19 s a chunk at 30,000 users).
    ids = [
        "SELECT unnest(%s::bigint[])",
        _per_key_probes("p.id", f"SELECT id FROM {users} WHERE email_key = k.key AND workspace_id + 0 = %s"),
    ]
    params: list = [workspace.pk, int_array(pks), text_array(email_keys), workspace.pk]
    if owners_of:
        owned, owned_params = _owner_probes(workspace, owners_of, "p.user_id")
        ids.append(owned)
        params += owned_params
    return (
        f"SELECT {_locked_columns(connection.vendor)} FROM {users} "
        f"WHERE workspace_id + 0 = %s AND id = ANY(ARRAY({' UNION ALL '.join(ids)})) ORDER BY id FOR UPDATE",
        params,
    )


@functools.cache
def _locked_columns(vendor: str) -> str:
    """The users' columns as ``users_from_rows`` reads them: built once per process (and
    vendor, whose quoting it uses), not per identify (≈ 2 % of an identify's app CPU)."""
    quote = connection.ops.quote_name
    as_text = (models.DateTimeField, models.JSONField)
    return ", ".join(
        f"{quote(f.column)}::text" if isinstance(f, as_text) else quote(f.column) for f in EndUser._meta.concrete_fields
    )


def users_from_rows(rows: list[tuple]) -> list[EndUser]:
    """Users from ``lock_users_sql``'s rows."""
    parsed = _parsers()
    users = []
    for row in rows:
        # What EndUser.from_db() builds (attributes by field, a saved _state) without the
        # model constructor's walk over every field (~30 µs a user).
        user = EndUser.__new__(EndUser)
        state = ModelState()
        state.adding, state.db = False, connection.alias
        user._state = state
        user.__dict__.update(
            (name, value if parse is None or value is None else parse(value))
            for (name, parse), value in zip(parsed, row, strict=True)
        )
        users.append(user)
    return users


@functools.cache
def _parsers() -> list[tuple[str, Callable[[str], object] | None]]:
    """Each column's attribute name and text parser, in ``_locked_columns``' order: once per process."""
    return [(f.attname, _text_parser(f)) for f in EndUser._meta.concrete_fields]


def _text_parser(field: models.Field) -> Callable[[str], object] | None:
    if isinstance(field, models.DateTimeField):
        # The session's TimeZone is UTC (Django sets it): "2024-01-01 10:00:00.123+00".
        return datetime.fromisoformat
    if isinstance(field, models.JSONField):
        return json.loads
    return None


def copy_in(objects: list[models.Model]) -> None:
    """Insert new rows with COPY, their ids drawn from the table's sequence first (PostgreSQL).

    ``bulk_create`` prepares every value through the ORM, about 100 µs a row for a user and
    its identity; COPY takes the values as they are, in COPY's binary format (the server
    parses no text). Same rows, same defaults (the objects were built by their model's
    constructor). Errors are Django's (a unique violation is an ``IntegrityError``, which
    the caller's retry understands).
    """
    if not objects:
        return
    meta = objects[0]._meta
    fields = tuple(meta.concrete_fields)
    for obj, pk in zip(objects, next_ids(meta.db_table, len(objects)), strict=True):
        obj.pk = pk
        obj._state.adding = False
    get = operator.attrgetter(*(f.attname for f in fields))
    copy_binary(meta.db_table, [f.column for f in fields], copy_types(fields), map(get, objects))


def copy_identities(workspace: Workspace, pairs: Iterable[tuple[EndUser, str]], created_at: datetime) -> None:
    """Insert identities, a (user, userId) pair each, with COPY (PostgreSQL): the users have
    their ids by now, the identities' own come from the column's default."""
    fields = tuple(UserIdentity._meta.get_field(name) for name in ("workspace", "user", "external_id", "created_at"))
    workspace_pk = workspace.pk
    copy_binary(
        UserIdentity._meta.db_table,
        [f.column for f in fields],
        copy_types(fields),
        ((workspace_pk, user.pk, user_id, created_at) for user, user_id in pairs),
    )


# PostgreSQL's name of a Django column type (``Field.db_type``), for COPY's binary format.
_BINARY_TYPES = {
    "bigint": "int8",
    "integer": "int4",
    "smallint": "int2",
    "text": "text",
    "timestamp with time zone": "timestamptz",
    "jsonb": "jsonb",
    "boolean": "bool",
}


@functools.cache
def copy_types(fields: tuple[models.Field, ...]) -> tuple[str, ...]:
    """Each field's column type as ``copy_binary`` takes it (PostgreSQL); ``varchar(n)`` is
    ``text`` there (the same bytes). Worked out once per set of fields (a COPY a chunk asks
    again). A type missing here is a ``ValueError``, at the first COPY of its table: a new
    column's type gets its line in ``_BINARY_TYPES``."""
    types = []
    for field in fields:
        db_type = field.db_type(connection)  # a foreign key's is its target's
        db_type = "text" if db_type and db_type.startswith("varchar(") else db_type
        if db_type not in _BINARY_TYPES:
            raise ValueError(f"no binary COPY type for {field.model.__name__}.{field.name} ({db_type})")
        types.append(_BINARY_TYPES[db_type])
    return tuple(types)


def count_created_users_for_the_planner(created: int) -> bool:
    """Before the deferred checks of a transaction that created ``created`` users run (a CSV
    import runs them after each chunk, ``users.csv_import._ChecksPerChunk``): ``ANALYZE`` the
    users' table when the planner's estimate of its size is below that (PostgreSQL). True if
    it ran.

    The checks test each new identity's reference to its user with ``SELECT 1 … WHERE id =
    $1 FOR KEY SHARE``. When the table was analysed while empty over pages that exist (every
    user deleted, then analysed), the planner estimates it at no rows however it grows: the
    primary key and ``enduser_ws_created_idx`` (whose last column is ``id``) then cost the
    same, the tie goes to the latter, and each check walks that whole index, so the checks
    are quadratic in the users created (1.2 s a check at 8,000). Autovacuum cannot correct it:
    it does not see this transaction's rows; an ``ANALYZE`` here does, and the checks are
    planned after it. A table never analysed is estimated from its size, and is left alone.

    The lock ``ANALYZE`` takes is held until the commit (from the first chunk whose checks
    needed it, in an import: other analyses and vacuums of the table skip it or wait that
    long), and a second import waiting for it
    could wait on a user this one's checks lock: the lock is only tried, and when another
    import or a vacuum holds it the statistics are left as they are.
    """
    if connection.vendor != "postgresql" or created <= 0:
        return False
    table = EndUser._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples, relpages, pg_relation_size(oid) / current_setting('block_size')::int "
            "FROM pg_class WHERE oid = %s::regclass",
            [table],
        )
        tuples, pages, pages_now = cursor.fetchone()
        # PostgreSQL's own estimate (estimate_rel_size): the analysed density times the size now.
        if tuples < 0 or pages == 0 or tuples / pages * pages_now >= created:
            return False
        try:
            with transaction.atomic():
                cursor.execute(f"LOCK TABLE {connection.ops.quote_name(table)} IN SHARE UPDATE EXCLUSIVE MODE NOWAIT")
        except OperationalError:
            return False
        cursor.execute(f"ANALYZE {connection.ops.quote_name(table)}")
    return True


# Rows per UPDATE statement on SQLite: 500 rows x 12 parameters stays below its limit.
_UPDATE_BATCH = 500


def update_users(users: list[EndUser]) -> None:
    """Write back users' profile fields: one UPDATE joined to the new values per batch."""
    fields = [EndUser._meta.get_field(name) for name in PROFILE_COLUMNS]
    table = connection.ops.quote_name(EndUser._meta.db_table)
    columns = [connection.ops.quote_name(f.column) for f in fields]
    if connection.vendor == "postgresql":
        # COPY the new values into a scratch table (dropped at commit), then one UPDATE joins it.
        quote = connection.ops.quote_name
        scratch = quote("kana_csv_user_changes")
        with connection.cursor() as cursor:
            cursor.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {scratch} ON COMMIT DROP AS "
                f"SELECT id, {', '.join(columns)} FROM {table} WITH NO DATA"
            )
            get = operator.attrgetter("pk", *(f.attname for f in fields))
            copy_binary(scratch, ["id", *columns], copy_types((EndUser._meta.pk, *fields)), map(get, users))
            assignments = ", ".join(f"{column} = v.{column}" for column in columns)
            cursor.execute(f"UPDATE {table} SET {assignments} FROM {scratch} AS v WHERE {table}.id = v.id")
            cursor.execute(f"TRUNCATE {scratch}")
        return
    placeholder = "(" + ", ".join(["%s"] * (len(fields) + 1)) + ")"
    assignments = ", ".join(f"{column} = v.{column}" for column in columns)
    with connection.cursor() as cursor:
        for start in range(0, len(users), _UPDATE_BATCH):
            batch = users[start : start + _UPDATE_BATCH]
            params = []
            for user in batch:
                params.append(user.pk)
                params.extend(f.get_db_prep_save(getattr(user, f.attname), connection) for f in fields)
            cursor.execute(
                f"WITH v (id, {', '.join(columns)}) AS (VALUES {', '.join([placeholder] * len(batch))}) "
                f"UPDATE {table} SET {assignments} FROM v WHERE {table}.id = v.id",
                params,
            )
