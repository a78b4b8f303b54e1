"""``python bench/run.py``, as the README and docs/performance.md write it, with the system python."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs the suite to run in a virtualenv (.venv)")
def test_it_reruns_under_the_project_venv_from_the_system_python():
    # The interpreter the venv was made from: `python3` outside the venv. It has no Django, and
    # its resolved executable is the venv python's, which is what used to fool the re-exec.
    system_python = Path(sys.base_prefix) / "bin" / "python3"
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        part for part in env.get("PATH", "").split(os.pathsep) if not part.startswith(sys.prefix)
    )
    result = subprocess.run(
        [str(system_python), "bench/run.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout
