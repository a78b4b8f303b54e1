"""The usage's rule index becomes partial (``WHERE rule_id IS NOT NULL``): usage mapped by
featureId (most single tracks, every consume) has no rule and wrote a NULL entry into it that
no read looks up; every read of it is by rule (``rule_is_used``, Django's SET_NULL), which the
partial index serves (docs/performance-history.md, "Round 13: s1pg").

The usage table is the largest and most written: the partial index is built, and the full one
then dropped, ``CONCURRENTLY`` on PostgreSQL, so ingest's writes go on while they run
(``tests/test_online_migrations.py``); reads by rule have an index throughout. As in 0006,
the foreign key gets ``db_index=False`` in the state only and its index is dropped by its
introspected name: an ``AlterField`` would rebuild ``features_usage`` on SQLite and lose the
usage counters' triggers.
"""

import django.db.models.deletion
from django.db import migrations, models

from kana.db.migration_ops import AddIndexConcurrentlyOnPostgres

PARTIAL = "usage_rule_idx"


def drop_full_rule_index(apps, schema_editor):
    usage = apps.get_model("features", "usage")
    column = usage._meta.get_field("rule").column
    names = schema_editor._constraint_names(usage, [column], index=True, unique=False, primary_key=False)
    for name in names:
        if name == PARTIAL:
            continue
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {schema_editor.quote_name(name)}")
        else:
            schema_editor.execute(schema_editor._delete_index_sql(usage, name))


def create_full_rule_index(apps, schema_editor):
    usage = apps.get_model("features", "usage")
    schema_editor.execute(schema_editor._create_index_sql(usage, fields=[usage._meta.get_field("rule")]))


class Migration(migrations.Migration):
    atomic = False  # CREATE / DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("features", "0010_reprocessing_job_parts")]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="usage",
            index=models.Index(condition=models.Q(("rule__isnull", False)), fields=["rule"], name=PARTIAL),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="usage",
                    name="rule",
                    field=models.ForeignKey(
                        blank=True,
                        db_constraint=False,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="usage",
                        to="features.mappingrule",
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(drop_full_rule_index, create_full_rule_index)],
        ),
    ]
