"""What Django's start imports, and that it is enough for any module to be imported first.

Celery is imported only where a task is defined or sent (``kana.jobs``), not at Django's
start: every command and web worker would pay for it (docs/performance-history.md, "Round 19").
Since the apps no longer import their tasks at ``ready()``, nothing fixes the order in which
the rest of a package is first imported: any module must import cleanly first, after
``django.setup()``, as a view, a command or a task may be the first to need it.

Each check runs in a fresh interpreter (a real process); none needs a database.
"""

import os
import subprocess
import sys
import textwrap

from .conftest import ROOT

_APPS = ("kana", "users", "features", "segment_ingest", "entitlements", "webhooks", "api", "dashboard")


def _python(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KANA_DEBUG": "1", "LOG_LEVEL": "WARNING", "DJANGO_SETTINGS_MODULE": "kana.settings"}
    prelude = "import django, sys\ndjango.setup()\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_djangos_start_a_command_and_the_web_app_do_not_import_celery():
    result = _python(
        """
        from django.urls import get_resolver
        import kana.wsgi
        import users.management.commands.import_users, users.management.commands.export_users
        get_resolver().url_patterns  # every view module
        print(sorted({name.split(".")[0] for name in sys.modules} & {"celery", "kombu"}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_task_is_found_by_its_name_in_a_process_that_never_imported_it():
    result = _python(
        """
        from django.conf import settings
        from kana import jobs
        from features.services import REPROCESSING_TASK
        from users.csv_import import IMPORT_TASK
        from webhooks.services import SEND_DELIVERY_TASK
        names = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
        names |= {REPROCESSING_TASK, IMPORT_TASK, SEND_DELIVERY_TASK}
        for name in sorted(names):
            task = jobs.registered_task(name)
            assert task.name == name and task.app is jobs.celery_app(), name
        print(len(names))
        """
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 10


def test_any_module_of_the_apps_can_be_imported_first_after_djangos_start():
    # A forked child per module: each starts from the state django.setup() left, so a
    # circular import that only one first-import order trips shows up as that module's failure.
    result = _python(
        f"""
        import os, pkgutil, importlib, traceback
        modules = []
        for app in {_APPS!r}:
            package = importlib.import_module(app)
            for info in pkgutil.walk_packages(package.__path__, app + "."):
                if ".migrations" not in info.name and ".management.commands" not in info.name:
                    modules.append(info.name)
        failed = []
        for name in modules:
            if name in sys.modules:
                continue
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                failed.append(name)
        print(len(modules), failed)
        """
    )
    assert result.returncode == 0, result.stderr
    count, failed = result.stdout.split(" ", 1)
    assert failed.strip() == "[]", result.stderr
    assert int(count) > 50
