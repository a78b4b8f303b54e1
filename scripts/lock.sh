#!/usr/bin/env bash
# Resolve requirements.in and requirements-dev.in into the hashed lock files requirements.txt
# (runtime) and requirements-dev.txt (test tools on top of it), for Python 3.11 on any platform.
# Existing pins are kept unless asked: `scripts/lock.sh --upgrade` (everything) or
# `scripts/lock.sh --upgrade-package django`. Needs uv: the pinned one below, installed once in
# .venv-lock unless `uv` is on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
if command -v uv >/dev/null 2>&1; then
  UV=uv
else
  if [ ! -x .venv-lock/bin/uv ]; then
    "${PYTHON:-python3}" -m venv .venv-lock
    PIP_CONSTRAINT= .venv-lock/bin/pip install --quiet "uv==$UV_VERSION"
  fi
  UV=.venv-lock/bin/uv
fi
# uv reads PyPI only (no pip configuration), so the locks name the files everyone downloads.
compile() { "$UV" pip compile --quiet --universal --python-version 3.11 --generate-hashes "${args[@]}" "$@"; }
args=("$@")
compile requirements.in -o requirements.txt
compile requirements-dev.in -o requirements-dev.txt
