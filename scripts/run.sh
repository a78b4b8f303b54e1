#!/usr/bin/env bash
# Run Kana embedded: SQLite, tasks in-process, a demo workspace; serves on :8000.
# Installs the runtime lock only (no test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ ! -f .env ]; then
  # Settings read .env, so the README's manage.py commands work here without exports.
  echo "==> writing .env (KANA_DEBUG=1 and a new SECRET_KEY; local use only, git-ignored)"
  (umask 077 && .venv/bin/python -c 'import secrets
print("# Written by `make run` for this checkout; the environment wins over it. Not for production.")
print("KANA_DEBUG=1")
print(f"SECRET_KEY={secrets.token_urlsafe(50)}")' > .env)
fi
.venv/bin/python manage.py migrate --no-input -v0
.venv/bin/python manage.py demo
if [ "${KANA_DEMO_DATA:-0}" = 1 ]; then
  # Sample users (with duplicates to review), events (some unmapped), features and a rule.
  .venv/bin/python manage.py demo_data
fi
exec .venv/bin/python manage.py runserver "${KANA_ADDR:-127.0.0.1:8000}"
