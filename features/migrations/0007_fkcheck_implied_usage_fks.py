"""The usage table's implied references lose their constraints (docs/architecture.md, "Who
writes which table"): workspace (always its event's), feature and rule (written only under
the shared rules lock, which their deletion takes exclusively, refusing any with usage).
Each was a deferred check per usage row at COMMIT.

The fields get ``db_constraint=False`` in the state; the database side drops the
constraints by name, found by introspection, on PostgreSQL only. An ``AlterField`` would do
the same there, but on SQLite it rebuilds ``features_usage`` (new table, copy, rename),
which loses the usage counters' triggers of migration 0005 (as 0006 notes): SQLite keeps
its ``REFERENCES`` clauses. The columns and indexes stay, and Django's on_delete still
applies. Reversing adds the constraints back, which validates every usage row.
"""

import django.db.models.deletion
from django.db import migrations, models

from kana.db.migration_ops import drop_foreign_key_constraints

IMPLIED = ("workspace", "feature", "rule")


class Migration(migrations.Migration):
    dependencies = [
        ("features", "0006_drop_duplicate_indexes"),
        ("kana", "0003_workspace_anonymous_event_settings"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="usage",
                    name="feature",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="usage",
                        to="features.feature",
                    ),
                ),
                migrations.AlterField(
                    model_name="usage",
                    name="rule",
                    field=models.ForeignKey(
                        blank=True,
                        db_constraint=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="usage",
                        to="features.mappingrule",
                    ),
                ),
                migrations.AlterField(
                    model_name="usage",
                    name="workspace",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="kana.workspace",
                    ),
                ),
            ],
            database_operations=[drop_foreign_key_constraints("features", "Usage", IMPLIED)],
        )
    ]
