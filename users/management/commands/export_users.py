from django.core.management.base import BaseCommand

from kana.management.workspaces import WORKSPACE_HELP, workspace_from_argument
from users.csv_export import EXPORT_CHUNK_ROWS, export_row_count, export_users_csv_file
from users.management.progress import Progress


class Command(BaseCommand):
    # Moving data needs no system checks: they import every URL conf (DRF, the dashboard)
    # and cost about a second per run; `manage.py check` and the server still run them.
    requires_system_checks = []
    help = "Export every user of a workspace as CSV (UTF-8) to a file or stdout, with progress on stderr."

    def add_arguments(self, parser):
        parser.add_argument("workspace", help=WORKSPACE_HELP)
        parser.add_argument("output", nargs="?", default="-", help="file to write; '-' or nothing for stdout")

    def handle(self, *args, workspace, output, **options):
        found = workspace_from_argument(workspace)
        total = export_row_count(workspace=found)
        bar = Progress(self.stderr._out, "users")
        target = self.stdout if output == "-" else open(output, "w", encoding="utf-8", newline="")
        written = 0
        try:
            for index, piece in enumerate(export_users_csv_file(workspace=found)):
                if output == "-":
                    target.write(piece, ending="")
                else:
                    target.write(piece)
                if index:  # the first piece is the header
                    written = min(written + EXPORT_CHUNK_ROWS, total)
                    bar.update(written, total)
            bar.update(total, total)
        finally:
            bar.finish()
            if output != "-":
                target.close()
        if output != "-":
            self.stderr.write(f"exported {total:,} users to {output}")
