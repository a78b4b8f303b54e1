"""Settings read the environment, and the .env file `make run` writes, failing loudly on bad values.

Each case imports the settings in a fresh interpreter, so the environment is exactly the test's.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = "from django.conf import settings; print(settings.DEBUG, settings.SECRET_KEY, settings.ALLOWED_HOSTS)"


def settings_in(env: dict[str, str]) -> subprocess.CompletedProcess:
    kept = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**kept, "DJANGO_SETTINGS_MODULE": "kana.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_it_reads_the_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# written by make run\nKANA_DEBUG=1\nSECRET_KEY=from-the-file\n")
    result = settings_in({"KANA_ENV_FILE": str(env_file)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 2)[:2] == ["True", "from-the-file"]


def test_the_environment_wins_over_the_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("KANA_DEBUG=1\nSECRET_KEY=from-the-file\n")
    env = {"KANA_DEBUG": "0", "SECRET_KEY": "from-env", "ALLOWED_HOSTS": "a, b"}
    result = settings_in({"KANA_ENV_FILE": str(env_file), **env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False from-env ['a', 'b']"


def test_production_without_a_secret_key_refuses_to_start():
    result = settings_in({"KANA_ENV_FILE": os.devnull})
    assert result.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY must be set when KANA_DEBUG is off" in result.stderr


def test_a_bad_value_in_the_env_file_fails_loudly(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("KANA_DEBUG=maybe\nSECRET_KEY=x\n")
    result = settings_in({"KANA_ENV_FILE": str(env_file)})
    assert result.returncode != 0
    assert "KANA_DEBUG must be a boolean" in result.stderr


def test_the_env_file_is_never_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0
