#!/usr/bin/env bash
# Create .venv and install the locked dependencies (again only when a lock changed).
#   scripts/bootstrap.sh         the runtime lock (requirements.txt): what `make run` needs
#   scripts/bootstrap.sh --dev   plus the test tools (requirements-dev.txt): `make test`, `make lint`
# The locks carry hashes, so pip installs exactly the files they name or stops.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
locks=(requirements.txt)
if [ "${1:-}" = --dev ]; then
  locks+=(requirements-dev.txt)
fi
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-${#locks[@]}.sha256
want=$(cat "${locks[@]}" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing ${locks[*]}"
  # The lock alone decides: a machine-wide pip constraint file (pip.conf) is not applied.
  args=()
  for lock in "${locks[@]}"; do args+=(-r "$lock"); done
  PIP_CONSTRAINT= .venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes "${args[@]}"
  echo "$want" > "$stamp"
fi
