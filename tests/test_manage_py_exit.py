"""``manage.py`` skips the interpreter's last collections at exit (it freezes every object
first); everything else a command's exit does still happens: its output reaches the streams
whole, exit handlers run, and a failing command's status and message are unchanged.

Each test runs a real ``manage.py`` process; none needs a database.
"""

import os
import subprocess
import sys

from .conftest import ROOT

# Large enough to pass the streams' buffers many times over, with no newline at the end.
_LONG_OUTPUT = 300_000


def _manage(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KANA_DEBUG": "1", "LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "manage.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_commands_buffered_output_and_its_exit_handlers_are_not_lost():
    script = (
        "import atexit, sys; "
        "atexit.register(lambda: sys.stderr.write('handler ran')); "
        f"sys.stdout.write('x' * {_LONG_OUTPUT}); "
        "sys.stderr.write('err:')"
    )
    result = _manage("shell", "--no-startup", "-v", "0", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "x" * _LONG_OUTPUT
    assert result.stderr.endswith("err:handler ran")


def test_a_failing_command_keeps_its_status_and_message():
    script = "from django.core.management import CommandError; raise CommandError('nothing was changed')"
    result = _manage("shell", "--no-startup", "-v", "0", "-c", script)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("CommandError: nothing was changed"), result.stderr


def test_an_exception_that_escapes_a_command_is_still_reported():
    result = _manage("shell", "--no-startup", "-v", "0", "-c", "raise RuntimeError('boom at the end')")
    assert result.returncode == 1
    assert "RuntimeError: boom at the end" in result.stderr
