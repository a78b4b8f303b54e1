"""The triggers' writes to the daily usage counters and the touched keys become cheaper for
keys already written (docs/performance-history.md, "Round 10: s4par").

Each statement that writes usage upserts the counter and the touch row of every (user,
feature, day) key it touched; a reprocessing chunk of 5,000 events does thousands in one
transaction. Two changes:

- Both tables leave half of each heap page free (``fillfactor = 50``), so a counter's update
  can stay on its row's page (HOT): no new index entry, and the next statement's page pruning
  reclaims the old version. With full pages (the default, 100) almost no update found room:
  each wrote its new version to another page and new entries into both indexes, and the
  table grew to about thirty times its live rows during one reprocessing job. ``amount`` is
  in no index, which HOT also needs. The cost is pages for rows read by index one user at a
  time: disk, not reads. The setting applies to rows written from now on.
- A touch row that exists already is row-locked and left as it is (``DO UPDATE … WHERE
  false`` locks the conflicting row without writing a new version) instead of having its
  ``touches`` bumped. The lock is what the drain relies on (``features.counters.
  drain_touched_usage`` skips locked rows, so it never takes a key whose newest usage it
  could not see yet); the bump was only the way to take it, and cost a new row version.

PostgreSQL only: SQLite has no fillfactor, and its row triggers never bumped ``touches``.
"""

import importlib

from django.db import migrations

TABLES = ("features_usagecounter", "features_usagetouch")
# 0005's statements, except the touch; reversing puts 0005's functions back.
_0005 = importlib.import_module("features.migrations.0005_feature_units_and_usage_counters")
TOUCH = f"""
    INSERT INTO features_usagetouch ({_0005.KEY})
    SELECT DISTINCT workspace_id, user_id, feature_id, {_0005.DAY} FROM new_rows WHERE user_id IS NOT NULL ORDER BY 1, 2, 3, 4
    ON CONFLICT ({_0005.KEY}) DO UPDATE SET touches = features_usagetouch.touches WHERE false;
"""
FUNCTIONS = {
    "insert": _0005.UPSERT.format(deltas=_0005.NEW) + TOUCH,
    "update": _0005.UPSERT.format(deltas=f"{_0005.NEW} UNION ALL {_0005.OLD}") + _0005.DROP_ZEROS + TOUCH,
}


def _replace_functions(schema_editor, bodies: dict[str, str]) -> None:
    for operation, body in bodies.items():
        schema_editor.execute(
            f"CREATE OR REPLACE FUNCTION features_usage_counter_{operation}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN {body} RETURN NULL; END $$"
        )


def forward(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"ALTER TABLE {table} SET (fillfactor = 50)")
    _replace_functions(schema_editor, FUNCTIONS)


def backward(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"ALTER TABLE {table} RESET (fillfactor)")
    _replace_functions(schema_editor, {op: _0005.POSTGRES_TRIGGERS[op][1] for op in FUNCTIONS})


class Migration(migrations.Migration):
    dependencies = [("features", "0008_evfk_usage_event_fk")]

    operations = [migrations.RunPython(forward, backward)]
