#!/usr/bin/env bash
# `make run` smoke: in a copy of the project's tracked files (as a fresh clone has them), run
# `make run` on a loopback port and check what the README promises of that install: it serves,
# prints the workspace id, installs no test tools, writes .env; then the README's CSV commands
# exactly as written (`.venv/bin/python manage.py export_users Demo users.csv`, …) and
# `python3 bench/run.py --help` with the system python. Bounded waits; the trap stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SMOKE="run smoke"
work=$(mktemp -d "${TMPDIR:-/tmp}/kana-run-smoke.XXXXXX")
server=
failed=1
cleanup() {
  if [ -n "$server" ]; then
    stop_process_group "$server"
    wait 2>/dev/null || true
  fi
  if [ "$failed" = 1 ]; then
    echo "=== tail of make run's output" >&2
    tail -n 30 "$work/run.log" >&2 || true
  fi
  leave_work files
}
# shellcheck source=scripts/smoke_lib.sh
. scripts/smoke_lib.sh  # the working directory is the project here
trap cleanup EXIT

copy_tracked_files "$work/app"
cd "$work/app"
# Nothing of the caller's environment decides for the checkout: .env must.
unset KANA_DEBUG SECRET_KEY DATABASE_URL REDIS_URL KANA_ENV_FILE DJANGO_SETTINGS_MODULE VIRTUAL_ENV

port=$(free_port "$PYTHON")
step "make run (KANA_ADDR=127.0.0.1:$port)"
started=$(date +%s)
KANA_ADDR=127.0.0.1:$port setsid make run >"$work/run.log" 2>&1 &
server=$!
for i in $(seq 1 600); do
  kill -0 "$server" 2>/dev/null || fail "make run exited"
  if curl -fsS --max-time 2 "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then break; fi
  [ "$i" = 600 ] && fail "make run did not serve within 300 s"
  sleep 0.5
done
echo "make run served after $(($(date +%s) - started)) s (fresh copy, runtime lock only)"

workspace=$(sed -n 's/^  Workspace: *\([0-9][0-9]*\) (Demo).*/\1/p' "$work/run.log")
[ -n "$workspace" ] || fail "make run printed no workspace id"
KEY=$(sed -n 's/^  API key: *//p' "$work/run.log")
echo "workspace $workspace, key ${KEY:0:13}…"
grep -qx "KANA_DEBUG=1" .env && grep -q "^SECRET_KEY=." .env || fail ".env lacks KANA_DEBUG=1 or a SECRET_KEY"
if .venv/bin/python -c "import pytest" 2>/dev/null || .venv/bin/python -c "import playwright" 2>/dev/null; then
  fail "make run installed test tools"
fi

step "the README's tour: one identify"
curl -fsS --max-time 10 -u "$KEY:" "http://127.0.0.1:$port/v1/identify" -H 'Content-Type: application/json' \
  -d '{"userId": "u-123", "traits": {"name": "John Doe", "email": "john@example.com", "billingId": "cus_Lp1bSKob4laHDD"}}'
echo

step "the README's CSV commands, as written"
.venv/bin/python manage.py export_users Demo users.csv
grep -q ",u-123,John Doe,john@example.com," users.csv || fail "the export lacks u-123"
.venv/bin/python manage.py import_users Demo users.csv --dry-run   # per-row report, nothing changed
.venv/bin/python manage.py import_users Demo users.csv             # all-or-nothing
.venv/bin/python manage.py export_users "$workspace" by-id.csv
cmp -s users.csv by-id.csv || fail "export by id and by name differ"

step "make demo's sample data (the command it adds to make run), twice: idempotent"
.venv/bin/python manage.py demo_data
.venv/bin/python manage.py demo_data
users=$(curl -fsS --max-time 10 -H "Authorization: Bearer $KEY" "http://127.0.0.1:$port/api/v1/users" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["count"])')
[ "$users" -ge 8 ] || fail "demo data made $users users"

step "python3 bench/run.py --help with the system python (re-runs under .venv)"
PATH=$(echo "$PATH" | tr ':' '\n' | grep -v "/.venv/bin" | paste -sd:) "$PYTHON" bench/run.py --help >"$work/bench-help.txt"
grep -q -- "--quick" "$work/bench-help.txt" || fail "bench/run.py --help printed no usage"
head -n 1 "$work/bench-help.txt"

failed=0
echo "run smoke passed"
