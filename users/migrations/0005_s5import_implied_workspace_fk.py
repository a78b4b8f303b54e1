"""Fewer writes per created user (docs/architecture.md, "Who writes which table").

- ``users_enduser.workspace_id`` loses its single-column index: the unique
  ``(workspace, user_id)``, ``(workspace, email_key)`` and ``(workspace, created_at, id)``
  indexes all lead with it. Only the index is dropped (SeparateDatabaseAndState): Django's
  AlterField would also drop and re-add the foreign key, and re-adding it validates every
  user under a lock that blocks writes to the table.
- ``users_useridentity.workspace_id`` loses its constraint (its user's reference implies
  it: one deferred check fewer per identity at COMMIT) and its index (the unique
  ``(workspace, external_id)`` leads with it).
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("kana", "0003_workspace_anonymous_event_settings"),
        ("users", "0004_suppression_and_anonymous_link"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="enduser",
                    name="workspace",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="kana.workspace",
                    ),
                ),
            ],
            database_operations=[
                # The name Django gave the index in 0001 (the same on PostgreSQL and SQLite).
                migrations.RunSQL(
                    "DROP INDEX IF EXISTS users_enduser_workspace_id_f5bd1e7b",
                    reverse_sql="CREATE INDEX users_enduser_workspace_id_f5bd1e7b ON users_enduser (workspace_id)",
                ),
            ],
        ),
        migrations.AlterField(
            model_name="useridentity",
            name="workspace",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="kana.workspace",
            ),
        ),
    ]
