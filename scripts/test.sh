#!/usr/bin/env bash
# Run the test suite. DATABASE_URL/REDIS_URL choose PostgreSQL and a real Celery worker;
# without them the suite runs on SQLite with tasks in-process (PostgreSQL-only and worker
# tests then skip, saying why). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "chromium could not be installed: browser tests will skip"
  else
    echo "chromium is not installed: browser tests will skip (apt-get install chromium)"
  fi
fi
# Models and migrations must agree (development settings: no secrets needed for the check).
if ! out=$(KANA_DEBUG=1 .venv/bin/python manage.py makemigrations --check --dry-run 2>&1); then
  echo "$out"
  echo "models changed without a migration (or the check failed): run manage.py makemigrations"
  exit 1
fi
exec .venv/bin/python -m pytest "$@"
