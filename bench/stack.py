"""The benchmark's own stack: a throw-away PostgreSQL database, gunicorn and a Celery worker.

Every process is started in its own session and stopped by its process group id, so the
harness only ever stops what it started.
"""

import compileall
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def server_url(database: str = "postgres") -> str:
    base = os.environ.get("KANA_BENCH_POSTGRES", "postgres://root@127.0.0.1:5432")
    return f"{base.rstrip('/')}/{database}"


# What the run's processes import: the app and the bench's own settings and views.
_NOT_IMPORTED = re.compile(r"[/\\](\.venv|\.git|tests|var|node_modules)[/\\]")


def compile_bytecode() -> None:
    """Write the app's bytecode (``__pycache__``) before any process of the run starts.

    A deployment imports compiled modules: Python writes them at the first import, or the
    install compiles them. A machine whose environment sets ``PYTHONDONTWRITEBYTECODE``
    (this one does) never writes them, so each process the run starts (gunicorn's workers,
    the Celery worker, every ``manage.py`` of S5) compiled the app's ≈ 80 modules from
    source again: ≈ 75 ms a start (docs/performance-history.md, "Round 17"). ``compileall`` writes
    them whatever that setting says; modules unchanged since are only checked.
    """
    compileall.compile_dir(ROOT, quiet=1, rx=_NOT_IMPORTED)


def create_database(name: str) -> None:
    with psycopg.connect(server_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    with psycopg.connect(server_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict
    log_path: Path
    process: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)

    def start(self) -> "Service":
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        """The process and its children (gunicorn's workers, say)."""
        if not self.alive():
            return []
        pids = [self.process.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self._log:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


def gunicorn(env: dict, port: int, workers: int, log_dir: Path, *, threads: int = 1) -> Service:
    """gunicorn as the README runs it: sync workers, or gthread workers when ``threads`` > 1
    (the bench's ``--threads``, to compare the worker models on the same code)."""
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "kana.wsgi:application",
        "--worker-class",
        "gthread" if threads > 1 else "sync",
        "--threads",
        str(threads),
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "--timeout",
        "120",
    ]
    return Service("gunicorn", argv, env, log_dir / "gunicorn.log").start()


def celery_worker_argv(*options: str, loglevel: str = "WARNING", concurrency: int = 1) -> list[str]:
    """``celery worker`` for the project without gossip or mingle: one task at a time (solo
    pool), or ``concurrency`` tasks at once in prefork processes (the README's production
    worker runs 2); ``options`` are added (the tests' worker runs beat too). Shared with the tests."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "kana",
        "worker",
        "--pool=solo" if concurrency == 1 else "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        *options,
    ]


# Task processes of the bench's worker: what the README's production worker runs
# (``celery -A kana worker --concurrency 2``), so a rule's reprocessing parts run at once.
WORKER_CONCURRENCY = 2


def celery_worker(env: dict, log_dir: Path) -> Service:
    argv = celery_worker_argv(concurrency=WORKER_CONCURRENCY)
    return Service("worker", argv, env, log_dir / "worker.log").start()


def wait_for_http(port: int, path: str = "/healthz", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer {path} within {timeout}s")


# --- CPU accounting, to say what a figure was limited by -----------------------------------


def process_cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def run_queue_wait_seconds(pid: int) -> float:
    """How long a process has waited, runnable, for a CPU (the scheduler's ``run_delay``)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def peak_rss_kib(pid: int) -> int:
    """A live process's resident-memory high-water mark (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# What else the server did while a window ran: checkpoints (server-wide: any database's
# writes end up in them) and this database's autovacuum and autoanalyze runs.
_SERVER_COUNTERS = """
    SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint, buffers_backend,
           (SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables),
           (SELECT coalesce(sum(autoanalyze_count), 0) FROM pg_stat_user_tables)
    FROM pg_stat_bgwriter
"""
_AUTOVACUUM_WORKERS = """
    SELECT count(*) FILTER (WHERE datname = current_database()), count(*)
    FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'
"""


class CpuMeter:
    """CPU used while a scenario runs by the app, the worker and the PostgreSQL backends
    serving the benchmark's database (sampled twice a second, so processes that come and
    go are counted): seconds, and cores (1.0 = one core busy the whole time).
    ``machine_busy`` is the whole machine, whoever used it (other tenants included).

    ``disturbances`` says what else ran in the same time: checkpoints started or ended and the
    buffers they wrote, autovacuum and autoanalyze runs finished on this database, the samples
    that saw an autovacuum worker (on this database, on any), and the app's processes that
    were born during the window (a recycled or restarted gunicorn worker)."""

    INTERVAL = 0.5

    def __init__(self, services: dict[str, Service], dsn: str, exclude_backends: set[int]):
        self.services, self.dsn, self.exclude = services, dsn, exclude_backends
        self.first: dict[tuple[str, int], float] = {}
        self.last: dict[tuple[str, int], float] = {}
        self.waited_first: dict[tuple[str, int], float] = {}
        self.waited_last: dict[tuple[str, int], float] = {}
        self.connections_opened: dict[int, str] = {}
        self.stopping = threading.Event()
        self.autovacuum_seen = [0, 0]
        self.samples = 0
        self.born: set[tuple[str, int]] = set()

    def _sample(self, conn: psycopg.Connection, initial: bool) -> None:
        groups = {name: service.pids() for name, service in self.services.items()}
        rows = conn.execute(
            "SELECT pid, to_char(backend_start AT TIME ZONE 'UTC', 'HH24:MI:SS.MS'), backend_type"
            " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        groups["postgres"] = [pid for pid, _, _ in rows if pid not in self.exclude]
        if not initial:
            for pid, started, kind in rows:
                if kind == "client backend" and pid not in self.exclude and ("postgres", pid) not in self.first:
                    self.connections_opened[pid] = started
        for name, pids in groups.items():
            for pid in pids:
                used = process_cpu_seconds([pid])
                waited = run_queue_wait_seconds(pid)
                # A process first seen after the start was born during the scenario.
                if not initial and (name, pid) not in self.first and name != "postgres":
                    self.born.add((name, pid))
                self.first.setdefault((name, pid), used if initial else 0.0)
                self.last[(name, pid)] = used
                self.waited_first.setdefault((name, pid), waited if initial else 0.0)
                self.waited_last[(name, pid)] = waited
        ours, anywhere = conn.execute(_AUTOVACUUM_WORKERS).fetchone()
        self.autovacuum_seen[0] += bool(ours)
        self.autovacuum_seen[1] += bool(anywhere)
        self.samples += 1

    def _counters(self, conn: psycopg.Connection) -> tuple[int, ...]:
        conn.execute("SELECT pg_stat_clear_snapshot()")  # the statistics as of now, not cached
        return tuple(int(v) for v in conn.execute(_SERVER_COUNTERS).fetchone())

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self.counters_before = self._counters(conn)
            self._sample(conn, initial=True)
            self.ready.set()
            while not self.stopping.wait(self.INTERVAL):
                self._sample(conn, initial=False)
            self._sample(conn, initial=False)
            self.counters_after = self._counters(conn)

    @property
    def disturbances(self) -> dict:
        delta = [after - before for before, after in zip(self.counters_before, self.counters_after, strict=True)]
        return {
            "checkpoints": delta[0],
            "checkpoint_buffers_written": delta[1],
            "backend_buffers_written": delta[2],
            "autovacuums": delta[3],
            "autoanalyzes": delta[4],
            "samples_with_autovacuum_here": self.autovacuum_seen[0],
            "samples_with_autovacuum_anywhere": self.autovacuum_seen[1],
            "samples": self.samples,
            "app_processes_born": sorted(f"{name}:{pid}" for name, pid in self.born),
            # Database connections opened during the window, when (CONN_MAX_AGE expiring, say).
            "connections_opened_at": sorted(self.connections_opened.values()),
            # Seconds the app's and PostgreSQL's processes spent runnable but waiting for a CPU.
            "run_queue_wait_seconds": {
                name: round(sum(w - self.waited_first[key] for key, w in self.waited_last.items() if key[0] == name), 3)
                for name in {key[0] for key in self.waited_last}
            },
        }

    def __enter__(self) -> "CpuMeter":
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)
        self.started = time.monotonic()
        self.machine_before = machine_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.monotonic() - self.started
        busy, total = machine_cpu()
        self.stopping.set()
        self.thread.join(10)
        self.seconds: dict[str, float] = {}
        for (name, pid), used in self.last.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + used - self.first[(name, pid)]
        self.cores = {name: round(used / self.elapsed, 2) for name, used in self.seconds.items()}
        self.machine_busy = round(
            (busy - self.machine_before[0]) / max(1, total - self.machine_before[1]) * os.cpu_count(), 2
        )


class Profiler:
    """``py-spy record`` of a process (and its children) while a scenario runs, written as
    collapsed stacks; for measuring only (py-spy is not a project dependency)."""

    def __init__(self, pid: int, path: Path, *, subprocesses: bool):
        self.pid, self.path, self.subprocesses = pid, path, subprocesses
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Profiler":
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        argv = [py_spy, "record", "--pid", str(self.pid), "--format", "raw", "--rate", "250", "-o", str(self.path)]
        if self.subprocesses:
            argv.append("--subprocesses")
        self.process = subprocess.Popen(
            [*argv, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
