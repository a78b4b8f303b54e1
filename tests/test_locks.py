"""The dependency locks: declared once in requirements*.in, pinned with hashes in requirements*.txt.

Whether the runtime lock alone runs Kana (a worker included) is proven by scripts/prod_smoke.sh,
which CI runs after the suite; these tests keep the files' promises cheap to check.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEV_TOOLS = {"pytest", "pytest-django", "pytest-env", "playwright", "schemathesis", "ruff"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(path: str) -> dict[str, str]:
    """Names (with their extras) of the requirements an .in file declares."""
    names = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?", line)
            names[normalized(match.group(1))] = match.group(2) or ""
    return names


def locked(path: str) -> dict[str, tuple[str, list[str]]]:
    """Pinned version and hashes of every package of a lock file."""
    pins = {}
    text = (ROOT / path).read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            pins[normalized(match.group(1))] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


@pytest.mark.parametrize("lock", ["requirements.txt", "requirements-dev.txt"])
def test_every_locked_package_is_pinned_with_hashes(lock):
    pins = locked(lock)
    assert pins
    assert not [name for name, (_, hashes) in pins.items() if not hashes]
    requirement_lines = [line for line in (ROOT / lock).read_text().splitlines() if re.match(r"[A-Za-z0-9]", line)]
    assert len(requirement_lines) == len(pins), "every requirement line is an exact == pin"


def test_the_runtime_lock_has_the_worker_s_redis_transport():
    assert declared("requirements.in")["celery"] == "[redis]"
    runtime = locked("requirements.txt")
    # kombu's Redis transport imports these; without them the worker dies at start.
    assert {"kombu", "redis", "packaging"} <= runtime.keys()
    assert runtime["django"][0].startswith("5.2.")


def test_each_lock_covers_what_its_in_file_declares():
    assert declared("requirements.in").keys() <= locked("requirements.txt").keys()
    assert declared("requirements-dev.in").keys() <= locked("requirements-dev.txt").keys()


def test_the_runtime_lock_has_no_test_tools_and_the_dev_lock_agrees_with_it():
    runtime, dev = locked("requirements.txt"), locked("requirements-dev.txt")
    assert not DEV_TOOLS & runtime.keys()
    assert DEV_TOOLS <= dev.keys()
    shared = runtime.keys() & dev.keys()
    assert {name: runtime[name] for name in shared} == {name: dev[name] for name in shared}
