from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from entitlements.config import config_apply, config_export, config_parse, config_plan, config_yaml
from kana.errors import DomainError
from kana.management.workspaces import WORKSPACE_HELP, workspace_from_argument


class Command(BaseCommand):
    help = "Features and packages as code: export a workspace's as YAML, or apply a file's difference."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        export = actions.add_parser("export", help="write the workspace's features and packages as YAML")
        export.add_argument("workspace", help=WORKSPACE_HELP)
        export.add_argument("output", nargs="?", default="-", help="file to write; '-' or nothing for stdout")
        apply = actions.add_parser("apply", help="show and apply the difference a file makes")
        apply.add_argument("file", help="a YAML file as export writes it")
        apply.add_argument("--dry-run", action="store_true", help="show the difference, change nothing")
        apply.add_argument(
            "--workspace", help="apply to this workspace instead of the file's own (" + WORKSPACE_HELP + ")"
        )

    def handle(self, *args, action, **options):
        if action == "export":
            return self._export(options["workspace"], options["output"])
        return self._apply(options["file"], options["dry_run"], options.get("workspace"))

    def _export(self, workspace: str, output: str) -> None:
        text = config_yaml(config_export(workspace=workspace_from_argument(workspace)))
        if output == "-":
            self.stdout.write(text, ending="")
        else:
            Path(output).write_text(text, encoding="utf-8")
            self.stderr.write(f"exported to {output}")

    def _apply(self, path: str, dry_run: bool, workspace: str | None) -> None:
        try:
            config = config_parse(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise CommandError(f"cannot read {path}: {error}") from None
        except DomainError as error:
            raise CommandError(f"{path}: {error.message}") from None
        named = workspace or config["workspace"]
        if named is None:
            raise CommandError(f"{path} names no workspace: add `workspace: NAME` or pass --workspace")
        found = workspace_from_argument(str(named))
        plan = config_plan(workspace=found, config=config)
        for line in plan.lines:
            self.stdout.write(line)
        if plan.refusals:
            raise CommandError(f"{len(plan.refusals)} change(s) refused: nothing applied")
        if dry_run:
            self.stdout.write(
                f"dry run: {len(plan.changes)} change(s) to {found.name} (id {found.pk}), nothing applied"
            )
            return
        try:
            applied = config_apply(workspace=found, plan=plan)
        except DomainError as error:
            where = f" ({error.field})" if error.field else ""
            raise CommandError(f"refused{where}: {error.message}; nothing applied") from None
        self.stdout.write(f"applied {applied} change(s) to {found.name} (id {found.pk})")
