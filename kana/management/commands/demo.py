"""Set up (once) and print the demo workspace, API key and dashboard login for a local run."""

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from kana.models import Workspace
from kana.services import api_key_issue

CREDENTIALS = Path(settings.BASE_DIR) / "var" / "demo-credentials.txt"


class Command(BaseCommand):
    help = "Create the demo workspace with a key and an admin login (embedded runs only)."

    def handle(self, *args, **options):
        if not settings.DEBUG:
            raise CommandError("demo is for local runs (KANA_DEBUG=1); use create_workspace in production")
        workspace = Workspace.objects.filter(name="Demo").order_by("pk").first()
        if workspace is None or not CREDENTIALS.exists():
            workspace = workspace or Workspace.objects.create(name="Demo")
            issued = api_key_issue(workspace=workspace, name="demo")
            password = secrets.token_urlsafe(12)
            admin, _ = get_user_model().objects.get_or_create(username="admin")
            admin.set_password(password)
            admin.is_staff = admin.is_superuser = True
            admin.save()
            workspace.members.add(admin)
            CREDENTIALS.parent.mkdir(exist_ok=True)
            CREDENTIALS.write_text(f"api_key={issued.raw_key}\nusername=admin\npassword={password}\n")
            CREDENTIALS.chmod(0o600)
        values = dict(line.split("=", 1) for line in CREDENTIALS.read_text().split())
        address = os.environ.get("KANA_ADDR", "127.0.0.1:8000")
        self.stdout.write(
            "\n  Kana demo workspace ready\n"
            f"  Workspace:        {workspace.pk} ({workspace.name}); manage.py commands take either\n"
            f"  API key:          {values['api_key']}\n"
            f"  Dashboard login:  {values['username']} / {values['password']}  at http://{address}/\n"
            f"  (kept in {CREDENTIALS.relative_to(settings.BASE_DIR)}; delete it to issue new ones)\n"
        )
