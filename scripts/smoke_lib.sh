# Shared by the install smokes (sourced, not run).

# stop_process_group PID: TERM the process group PID leads, wait up to 10 s, then KILL it.
stop_process_group() {
  kill -TERM -- "-$1" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$1" 2>/dev/null || true
}
