#!/usr/bin/env bash
# Production smoke: install the runtime lock alone into a fresh virtualenv, then run the
# README's production commands as written (migrate, collectstatic, create_workspace, gunicorn,
# a Celery worker, beat) against PostgreSQL + Redis on loopback, and drive them over HTTP:
# one identify, one track, a rule created through the REST API reaching `done`, and a CSV import
# big enough to be queued to the worker reaching `done`. Fails on any traceback or ERROR line in
# the server's, worker's or beat's log. Every wait is bounded; the trap stops what it started.
#
#   scripts/prod_smoke.sh                 # database kana_smoke, redis db 11
#   KANA_SMOKE_DB=… KANA_SMOKE_REDIS_URL=redis://127.0.0.1:6379/N scripts/prod_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
DB=${KANA_SMOKE_DB:-kana_smoke}
SMOKE_REDIS_URL=${KANA_SMOKE_REDIS_URL:-redis://127.0.0.1:6379/11}
PG=${KANA_SMOKE_PG:-postgres://root@127.0.0.1:5432}
export PGOPTIONS="-c client_min_messages=warning"
started=$(date +%s)

SMOKE="prod smoke"
work=$(mktemp -d "${TMPDIR:-/tmp}/kana-prod-smoke.XXXXXX")
pids=()
failed=1
cleanup() {
  for pid in "${pids[@]}"; do stop_process_group "$pid"; done
  wait 2>/dev/null || true
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli -u "$SMOKE_REDIS_URL" flushdb >/dev/null 2>&1 || true
  if [ "$failed" = 1 ]; then
    for log in "$work"/*.log; do echo "=== tail of $log" >&2; tail -n 25 "$log" >&2; done
  fi
  leave_work logs
}
# shellcheck source=scripts/smoke_lib.sh
. scripts/smoke_lib.sh  # the working directory is the project here
trap cleanup EXIT

# Its own process group, so the trap stops gunicorn's and Celery's children too.
start() {  # start NAME COMMAND...
  local name=$1; shift
  setsid "$@" >"$work/$name.log" 2>&1 &
  pids+=("$!")
}

# The deployment: the project's tracked files.
copy_tracked_files "$work/app"
cd "$work/app"

step "fresh virtualenv from requirements.txt alone"
"$PYTHON" -m venv "$work/venv"
# The machine-wide pip constraint file (if any) is not part of the lock: the lock alone decides.
export PIP_CONSTRAINT=
install_started=$(date +%s)
"$work/venv/bin/pip" install --quiet --require-hashes -r requirements.txt
echo "installed in $(($(date +%s) - install_started)) s"
export PATH="$work/venv/bin:$PATH"
hash -r

psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql -q "$PG/postgres" -c "CREATE DATABASE $DB" >/dev/null
redis-cli -u "$SMOKE_REDIS_URL" flushdb >/dev/null

port=$(free_port python)
BASE=http://127.0.0.1:$port

# The README's production section, as written (loopback address, small pools, and a low
# inline-import limit so that the CSV import below goes to the worker).
SECRET_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(50))')
export SECRET_KEY DATABASE_URL="$PG/$DB" REDIS_URL="$SMOKE_REDIS_URL" ALLOWED_HOSTS=127.0.0.1
export SECURE_COOKIES=0 KANA_CSV_INLINE_MAX_ROWS=50 KANA_SWEEP_INTERVAL_SECONDS=2 KANA_MEDIA_ROOT="$work/media"
unset KANA_DEBUG KANA_ENV_FILE DJANGO_SETTINGS_MODULE
step "migrate, collectstatic, create_workspace, createsuperuser"
python manage.py migrate --no-input -v0
python manage.py collectstatic --no-input -v0
python manage.py create_workspace "Acme Inc" | tee "$work/workspace.txt"
KEY=$(sed -n 's/^API key (shown once, store it now): //p' "$work/workspace.txt")
[ -n "$KEY" ] || fail "create_workspace printed no API key"
DJANGO_SUPERUSER_PASSWORD=$(python -c 'import secrets; print(secrets.token_urlsafe(16))') \
  python manage.py createsuperuser --no-input --username admin --email admin@example.com
step "gunicorn, a Celery worker, beat"
start server gunicorn kana.wsgi -w 2 -b "127.0.0.1:$port"
start worker celery -A kana worker --concurrency 2 --loglevel INFO
start beat celery -A kana beat --loglevel INFO

# json FIELD.PATH < body: one value of a JSON answer (the venv's python, stdlib only).
json() { python -c 'import json, sys
value = json.load(sys.stdin)
for part in sys.argv[1].split("."):
    value = value[part]
print(value)' "$1"; }
alive() { for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || fail "a process died; see $work/*.log"; done; }
api() { curl -sS --max-time 10 -H "Authorization: Bearer $KEY" "$@"; }

step "wait for /readyz (database and broker)"
for i in $(seq 1 60); do
  alive
  if curl -fsS --max-time 2 "$BASE/readyz" >/dev/null 2>&1; then break; fi
  [ "$i" = 60 ] && fail "not ready after 30 s"
  sleep 0.5
done

step "identify and track over HTTP"
curl -fsS --max-time 10 -u "$KEY:" "$BASE/v1/identify" -H 'Content-Type: application/json' \
  -d '{"userId": "u-123", "traits": {"name": "John Doe", "email": "john@example.com"}}' | tee "$work/identify.json"
echo
[ "$(json success < "$work/identify.json")" = True ] || fail "identify was not accepted"
curl -fsS --max-time 10 -u "$KEY:" "$BASE/v1/track" -H 'Content-Type: application/json' \
  -d '{"userId": "u-123", "event": "Report Exported", "properties": {"plan": {"tier": "pro"}}}' | tee "$work/track.json"
echo
[ "$(json status < "$work/track.json")" = unmapped ] || fail "the track should be stored unmapped"

step "a feature and a rule through the REST API; the rule's reprocessing reaches done"
api -f "$BASE/api/v1/features" -H 'Content-Type: application/json' \
  -d '{"id": "exports", "name": "Report exports", "type": "CONSUMABLE"}' >/dev/null
api -f "$BASE/api/v1/rules" -H 'Content-Type: application/json' -d '{"name": "Pro exports",
  "feature": "exports", "event": "Report Exported", "active": true,
  "conditions": [{"property": "plan.tier", "operator": "equals", "value": "pro"}]}' >"$work/rule.json"
rule=$(json id < "$work/rule.json")
for i in $(seq 1 120); do
  alive
  api -f "$BASE/api/v1/rules/$rule" >"$work/rule.json"
  status=$(json reprocessing.status < "$work/rule.json")
  [ "$status" = done ] && break
  [ "$status" = failed ] && fail "the rule's reprocessing failed: $(cat "$work/rule.json")"
  [ "$i" = 120 ] && fail "the rule's reprocessing is still $status after 60 s"
  sleep 0.5
done
echo "rule $rule: $(json reprocessing < "$work/rule.json")"
[ "$(json reprocessing.mapped < "$work/rule.json")" = 1 ] || fail "the stored track was not mapped"

step "a CSV import above KANA_CSV_INLINE_MAX_ROWS, run by the worker, reaches done"
python -c 'import csv, sys
out = csv.writer(sys.stdout)
out.writerow(["user_id", "name", "email"])
for i in range(300):
    out.writerow([f"csv-{i}", f"User {i}", f"user{i}@example.com"])' >"$work/users.csv"
code=$(api -o "$work/import.json" -w '%{http_code}' -F "file=@$work/users.csv" "$BASE/api/v1/users/import")
[ "$code" = 202 ] || fail "the import should be queued (202), got $code: $(cat "$work/import.json")"
job=$(json id < "$work/import.json")
for i in $(seq 1 120); do
  alive
  api -f "$BASE/api/v1/users/imports/$job" >"$work/import.json"
  status=$(json status < "$work/import.json")
  [ "$status" = done ] && break
  [ "$status" = failed ] && fail "the import failed: $(cat "$work/import.json")"
  [ "$i" = 120 ] && fail "the import is still $status after 60 s"
  sleep 0.5
done
echo "import $job: $(json status < "$work/import.json"), $(json counts < "$work/import.json")"
[ "$(json counts.created < "$work/import.json")" = 300 ] || fail "the import did not create 300 users"

step "beat sends the sweepers; no traceback or error in any log"
for i in $(seq 1 30); do
  grep -q "Task features.tasks.sweep_stalled_jobs\[.*\] succeeded" "$work/worker.log" && break
  [ "$i" = 30 ] && fail "the worker never received the sweeper from beat"
  sleep 0.5
done
alive
if grep -n -E 'Traceback|"level": "(ERROR|CRITICAL)"|\] (ERROR|CRITICAL)' "$work"/server.log "$work"/worker.log "$work"/beat.log; then
  fail "errors in the logs above"
fi
failed=0
echo "prod smoke passed in $(($(date +%s) - started)) s"
