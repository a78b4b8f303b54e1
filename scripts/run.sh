#!/usr/bin/env bash
# Run Kana embedded: SQLite, tasks in-process, a demo workspace; serves on :8000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export KANA_DEBUG=${KANA_DEBUG:-1}
.venv/bin/python manage.py migrate --no-input -v0
.venv/bin/python manage.py demo
exec .venv/bin/python manage.py runserver "${KANA_ADDR:-127.0.0.1:8000}"
