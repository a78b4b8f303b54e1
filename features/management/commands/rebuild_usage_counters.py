"""manage.py rebuild_usage_counters [WORKSPACE]: recompute the daily usage counters from the
usage rows, report every difference found, and exit non-zero when there was one."""

import sys

from django.core.management.base import BaseCommand

from features.counters import rebuild_usage_counters
from kana.management.workspaces import workspace_from_argument


class Command(BaseCommand):
    help = "Rebuild the daily usage counters from the usage rows; exit code 1 if they differed."

    def add_arguments(self, parser):
        parser.add_argument("workspace", nargs="?", help="workspace id or name (default: every workspace)")

    def handle(self, *args, workspace=None, **options):
        workspace_id = workspace_from_argument(workspace).pk if workspace else None
        differences = rebuild_usage_counters(workspace_id)
        for d in differences:
            self.stdout.write(
                f"workspace {d.workspace_id} user {d.user_id} feature {d.feature_id} day {d.day}:"
                f" counted {d.counted.normalize()}, usage rows {d.actual.normalize()}"
            )
        self.stdout.write(f"{len(differences)} difference(s) found and fixed")
        if differences:
            sys.exit(1)
