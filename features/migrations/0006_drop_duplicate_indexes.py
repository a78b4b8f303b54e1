"""Drop three single-column indexes that composite indexes already lead with.

The foreign keys get ``db_index=False`` in the state only: the database side drops the
indexes by name, found by introspection. An ``AlterField`` would do the same on PostgreSQL,
but on SQLite it rebuilds ``features_usage`` (new table, copy, rename), which loses the
usage counters' triggers that migration 0005 created on it.
"""

import django.db.models.deletion
from django.db import migrations, models

# (model, field): the events' and usage's workspace, the usage's event.
INDEXED = (("event", "workspace"), ("usage", "event"), ("usage", "workspace"))


def drop_indexes(apps, schema_editor):
    for model_name, field_name in INDEXED:
        model = apps.get_model("features", model_name)
        column = model._meta.get_field(field_name).column
        for name in schema_editor._constraint_names(model, [column], index=True, unique=False, primary_key=False):
            schema_editor.execute(schema_editor._delete_index_sql(model, name))


def create_indexes(apps, schema_editor):
    for model_name, field_name in INDEXED:
        model = apps.get_model("features", model_name)
        field = model._meta.get_field(field_name)
        schema_editor.execute(schema_editor._create_index_sql(model, fields=[field]))


class Migration(migrations.Migration):
    dependencies = [
        ("features", "0005_feature_units_and_usage_counters"),
        ("kana", "0003_workspace_anonymous_event_settings"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="event",
                    name="workspace",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="kana.workspace",
                    ),
                ),
                migrations.AlterField(
                    model_name="usage",
                    name="event",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="usage",
                        to="features.event",
                    ),
                ),
                migrations.AlterField(
                    model_name="usage",
                    name="workspace",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="kana.workspace",
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(drop_indexes, create_indexes)],
        )
    ]
