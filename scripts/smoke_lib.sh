# Shared by the install smokes (sourced, not run).

# stop_process_group PID: TERM the process group PID leads, wait up to 10 s, then KILL it.
stop_process_group() {
  kill -TERM -- "-$1" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$1" 2>/dev/null || true
}

# step TEXT: announce a step of the smoke.
step() { echo "--- $*"; }

# copy_tracked_files DIR: the project's tracked files (and untracked ones git does not ignore)
# into the new directory DIR, as a fresh clone has them (no .venv, .env, var/ or staticfiles/).
copy_tracked_files() {
  step "copy the tracked files to $1"
  mkdir "$1"
  git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - | tar -xf - -C "$1"
}

# free_port PYTHON: a free TCP port on the loopback address, found by the given interpreter.
free_port() {
  "$1" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# fail MESSAGE: stop the smoke named $SMOKE with MESSAGE (its EXIT trap cleans up).
fail() { echo "$SMOKE: $*" >&2; exit 1; }

# leave_work WHAT: after a failure ($failed = 1) keep $work and say so, else remove it.
leave_work() {
  if [ "$failed" = 1 ]; then echo "$SMOKE FAILED; $1 kept in $work" >&2; else rm -rf "$work"; fi
}
