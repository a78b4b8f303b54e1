"""Drop the single-column workspace indexes of suppressions and anonymousId links (the identities' went in 0005).

Each table's ``(workspace, value)`` unique index leads with the workspace, so it serves every
read by workspace too. Left in place, the single-column index is a second candidate for the
ingest's per-message probe ``workspace_id = $1 AND value = $2``: a plan made while a table is
small (a prepared statement's generic plan lives until the next ANALYZE) may pick it and then
filter every row of the workspace (docs/performance-history.md, "Round 6: s1pg"). One index write less
per row, too. As in features 0006: the state only loses ``db_index``, the database side drops
the indexes by name, found by introspection (an ``AlterField`` would rebuild SQLite tables).
"""

import django.db.models.deletion
from django.db import migrations, models

# The identities' workspace index went in 0005 (with its foreign key constraint).
MODELS = ("suppression", "anonymouslink")


def drop_indexes(apps, schema_editor):
    for model_name in MODELS:
        model = apps.get_model("users", model_name)
        column = model._meta.get_field("workspace").column
        for name in schema_editor._constraint_names(model, [column], index=True, unique=False, primary_key=False):
            schema_editor.execute(schema_editor._delete_index_sql(model, name))


def create_indexes(apps, schema_editor):
    for model_name in MODELS:
        model = apps.get_model("users", model_name)
        schema_editor.execute(schema_editor._create_index_sql(model, fields=[model._meta.get_field("workspace")]))


def _workspace_field():
    return models.ForeignKey(
        db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name="+", to="kana.workspace"
    )


class Migration(migrations.Migration):
    dependencies = [
        ("kana", "0003_workspace_anonymous_event_settings"),
        ("users", "0005_s5import_implied_workspace_fk"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(model_name=model_name, name="workspace", field=_workspace_field())
                for model_name in MODELS
            ],
            database_operations=[migrations.RunPython(drop_indexes, create_indexes)],
        )
    ]
