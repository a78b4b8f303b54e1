from django.core.management.base import BaseCommand, CommandError

from kana.management.workspaces import WORKSPACE_HELP, workspace_from_argument
from users.csv_import import CsvFileError, import_users_csv
from users.management.progress import Progress
from users.models import ImportStatus

_SHOWN_ROWS = 20


class Command(BaseCommand):
    # Moving data needs no system checks: they import every URL conf (DRF, the dashboard)
    # and cost about a second per run; `manage.py check` and the server still run them.
    requires_system_checks = []
    help = (
        "Import users from a CSV file (the export's format) into a workspace, in this process, "
        "with progress on stderr. All or nothing: any row error changes nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("workspace", help=WORKSPACE_HELP)
        parser.add_argument("file", help="CSV file (UTF-8, with or without BOM)")
        parser.add_argument("--dry-run", action="store_true", help="report what would happen, change nothing")

    def handle(self, *args, workspace, file, dry_run, **options):
        found = workspace_from_argument(workspace)
        bar = Progress(self.stderr._out, "rows")
        try:
            with open(file, "rb") as source:
                # Run here whatever the size: a command does not need a worker.
                job = import_users_csv(
                    workspace=found,
                    file=source,
                    dry_run=dry_run,
                    actor="cli",
                    file_name=file,
                    run_inline=True,
                    progress=bar.update,
                )
        except FileNotFoundError:
            raise CommandError(f"no such file: {file}") from None
        except CsvFileError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        finally:
            bar.finish()
        if job.status == ImportStatus.FAILED:
            raise CommandError(f"{job.error_code}: {job.error}")
        counts = ", ".join(f"{n:,} {name}" for name, n in job.counts().items())
        self.stdout.write(f"{'dry run' if dry_run else 'import'} of {job.rows_total:,} rows: {counts}")
        errors = [row for row in job.sample if row["result"] == "error"]
        for row in errors[:_SHOWN_ROWS]:
            self.stdout.write(f"  row {row['row']}: {row['code']}: {row['error']}")
        if job.errors > _SHOWN_ROWS:
            self.stdout.write(f"  ... {job.errors - _SHOWN_ROWS:,} more errors (import job {job.pk})")
        if job.errors:
            raise CommandError("nothing was changed: fix the rows above and import again")
        self.stdout.write("nothing was changed (dry run)" if dry_run else "applied")
