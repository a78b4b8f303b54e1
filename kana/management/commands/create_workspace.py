from django.core.management.base import BaseCommand

from kana.services import workspace_create_with_key


class Command(BaseCommand):
    help = "Create a workspace and print it with a new API key (shown once)."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, *args, name, **options):
        issued = workspace_create_with_key(name=name)
        workspace = issued.api_key.workspace
        self.stdout.write(f"Workspace {workspace.pk}: {workspace.name}")
        self.stdout.write(f"API key (shown once, store it now): {issued.raw_key}")
