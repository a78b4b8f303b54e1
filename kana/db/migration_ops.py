"""Operations that more than one migration needs.

Migrations are history: what is here must keep doing what it did when they were written.
"""

import functools

from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations


def drop_foreign_key_constraints(app_label: str, model_name: str, field_names: tuple[str, ...]) -> migrations.RunPython:
    """Drop the database constraints of ``field_names`` (foreign keys of ``app_label.model_name``
    that stay foreign keys in the state, with ``db_constraint=False``), found by introspection,
    on PostgreSQL only; reversing adds them back, which validates every row.

    For ``SeparateDatabaseAndState``'s database side: an ``AlterField`` does the same on
    PostgreSQL, but on SQLite it rebuilds the table (new table, copy, rename), which loses the
    triggers defined on it; SQLite keeps its ``REFERENCES`` clauses.
    """

    def drop(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return
        model = apps.get_model(app_label, model_name)
        for name in field_names:
            column = model._meta.get_field(name).column
            for constraint in schema_editor._constraint_names(model, [column], foreign_key=True):
                schema_editor.execute(schema_editor._delete_fk_sql(model, constraint))

    def add(apps, schema_editor):
        if schema_editor.connection.vendor != "postgresql":
            return
        model = apps.get_model(app_label, model_name)
        for name in field_names:
            field = model._meta.get_field(name)
            schema_editor.execute(schema_editor._create_fk_sql(model, field, "_fk_%(to_table)s_%(to_column)s"))

    return migrations.RunPython(drop, add)


class _ConcurrentlyOnPostgres:
    """The concurrent form of an index operation on PostgreSQL, ``plain`` elsewhere (SQLite
    has no concurrent form, and its databases are small). The migration must be
    ``atomic = False``."""

    plain: type

    def _form(self, schema_editor, method: str):
        if schema_editor.connection.vendor == "postgresql":
            return getattr(super(), method)
        return functools.partial(getattr(self.plain, method), self)

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        self._form(schema_editor, "database_forwards")(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        self._form(schema_editor, "database_backwards")(app_label, schema_editor, from_state, to_state)


class AddIndexConcurrentlyOnPostgres(_ConcurrentlyOnPostgres, AddIndexConcurrently):
    """``CREATE INDEX CONCURRENTLY`` on PostgreSQL. A plain ``CREATE INDEX`` holds a SHARE lock
    on the table until it is built, so every write to a large table waits that long; the
    concurrent form lets writes go on. If it fails, it leaves an INVALID index behind: drop it
    (``DROP INDEX CONCURRENTLY <name>``) and migrate again."""

    plain = migrations.AddIndex


class RemoveIndexConcurrentlyOnPostgres(_ConcurrentlyOnPostgres, RemoveIndexConcurrently):
    """``DROP INDEX CONCURRENTLY`` on PostgreSQL (a plain ``DROP INDEX`` takes an ACCESS
    EXCLUSIVE lock on the table: it waits for every open transaction on it, and every later
    read and write waits behind it)."""

    plain = migrations.RemoveIndex
