"""The usage's ``event_id`` loses its constraint (docs/architecture.md, "Who writes which
table"): usage is written with its event in one statement, or onto a stored event the writer
row-locks under the shared rules lock; events are deleted only by a user's deletion (whose
user row lock and the usage's ``user_id`` check keep a concurrent writer out) and by a
workspace's (which takes the rules lock exclusively and is refused if it has usage). It was
a deferred check per usage row at COMMIT that also row-locked the event, which a
reprocessing chunk had just updated.

As in 0007: ``db_constraint=False`` in the state; the constraint is dropped by its
introspected name on PostgreSQL only (an ``AlterField`` on SQLite would rebuild
``features_usage`` and lose the counters' triggers), and reversing adds it back, which
validates every usage row.
"""

import django.db.models.deletion
from django.db import migrations, models

from kana.db.migration_ops import drop_foreign_key_constraints


class Migration(migrations.Migration):
    dependencies = [("features", "0007_fkcheck_implied_usage_fks")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="usage",
                    name="event",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="usage",
                        to="features.event",
                    ),
                ),
            ],
            database_operations=[drop_foreign_key_constraints("features", "Usage", ("event",))],
        )
    ]
