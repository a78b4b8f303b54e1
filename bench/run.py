"""Kana's benchmark: baselines and scenarios in one run, on one server, as ratios.

    python bench/run.py            # full run (1M events for S4, 1M users for the export)
    python bench/run.py --quick    # one- to two-minute smoke with smaller sizes

It creates its own PostgreSQL database (dropped at the end), migrates, creates workspaces and
keys, starts gunicorn (sync workers) and a Celery worker (2 task processes, as the README's
production worker), measures the baselines (B-insert, B-copy, B-update) and the scenarios
(S1-S8) of BENCH.md (the project's benchmark plan), checks after every scenario that each
message sent was stored exactly once, prints one table and writes it as JSON to
bench/results/latest.json. See docs/performance.md for what the figures mean.
"""

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _use_project_python() -> None:
    """``python bench/run.py`` works with any python: re-run under the project's venv.

    Whether this process runs in the venv is told by ``sys.prefix``, not by the executable: a
    venv's ``bin/python`` is a symlink to the very interpreter it was made from, so resolved
    executables are equal inside and outside it.
    """
    venv = ROOT / ".venv"
    venv_python = venv / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    try:
        import django  # noqa: F401
    except ImportError:
        raise SystemExit("Django is not installed: run scripts/bootstrap.sh first") from None


if __name__ == "__main__":  # imported (by a test), it runs where it is
    _use_project_python()
sys.path.insert(0, str(ROOT))

SIZES = {
    # warm-up and measured seconds per HTTP scenario; rows for S4 and S5; pools for S2.
    "quick": {"warmup": 2, "duration": 8, "events": 100_000, "import_rows": 10_000, "export_rows": 100_000},
    "full": {"warmup": 5, "duration": 30, "events": 1_000_000, "import_rows": 100_000, "export_rows": 1_000_000},
}
REDIS_DB_URL = "redis://127.0.0.1:6379/10"


def default_redis_url() -> str:
    """The Redis database the run uses as Celery's broker, flushed at the end: the one given
    for the benchmark, else the caller's own ``REDIS_URL`` (so two people running the
    benchmark on one Redis, each with their own database, never share a queue), else DB 10."""
    return os.environ.get("KANA_BENCH_REDIS_URL") or os.environ.get("REDIS_URL") or REDIS_DB_URL


def database_name() -> str:
    """``kana_bench_<pid>_<random>``: unique on a server shared by several checkouts (process
    ids repeat across containers), and never the name of anyone's own database, since the
    run drops it first."""
    return f"kana_bench_{os.getpid()}_{secrets.token_hex(3)}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run with smaller sizes")
    parser.add_argument("--only", default="", help="comma-separated scenario ids to run, e.g. S4,S5")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    parser.add_argument(
        "--stored",
        type=int,
        default=0,
        help="events already stored in each HTTP scenario's workspace before it runs (with one "
        "extra user per 25 of them), to compare the per-request cost at 1x and 10x data (default 0)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per gunicorn worker; above 1 the workers are gthread instead of sync (default 1)",
    )
    parser.add_argument("--connections", type=int, default=16, help="client connections (default 16)")
    parser.add_argument(
        "--settle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="before every measured window: VACUUM (ANALYZE), wait for autovacuum, CHECKPOINT (default on)",
    )
    parser.add_argument("--duration", type=float, help="measured seconds per HTTP scenario")
    parser.add_argument("--events", type=int, help="stored unmapped events for S4 (and rows for B-copy/B-update)")
    parser.add_argument("--import-rows", type=int, help="CSV rows imported in S5")
    parser.add_argument("--export-rows", type=int, help="users exported in S5")
    parser.add_argument("--redis-url", default=default_redis_url(), help="flushed at the end (default: $REDIS_URL)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument("--pause", action="store_true", help="wait for Enter before the scenarios (to profile)")
    parser.add_argument("--profile", metavar="DIR", help="record py-spy profiles of each scenario into DIR")
    parser.add_argument("--keep-logs", action="store_true", help="keep the server and worker logs")
    return parser.parse_args()


def configure(args) -> dict:
    sizes = dict(SIZES["quick" if args.quick else "full"])
    for name in ("duration", "events", "import_rows", "export_rows"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    sizes["duration"] = float(sizes["duration"])
    return sizes


def main() -> int:
    args = parse_args()
    sizes = configure(args)
    from bench import stack

    stack.compile_bytecode()
    database = database_name()
    log_dir = Path(tempfile.mkdtemp(prefix="kana-bench-"))
    env = {
        "DATABASE_URL": stack.server_url(database),
        "REDIS_URL": args.redis_url,
        # Generated per run, only ever in the environment of the processes started here.
        "SECRET_KEY": secrets.token_urlsafe(50),
        "KANA_DEBUG": "0",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "SECURE_COOKIES": "0",
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "bench.settings",
    }
    os.environ.update(env)
    stack.create_database(database)
    failed = True
    bench = None
    try:
        import django

        django.setup()
        from bench.scenarios import Bench

        bench = Bench(args=args, sizes=sizes, env={**os.environ}, log_dir=log_dir)
        bench.run()
        failed = False
    finally:
        if bench is not None:
            bench.close()
        from django.db import connections

        connections.close_all()
        stack.drop_database(database)
        _flush_redis(args.redis_url)
        if failed or args.keep_logs:
            print(f"logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    report = bench.report()
    print(report["table"])
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report["json"], indent=2) + "\n")
    output.with_suffix(".md").write_text(report["markdown"])
    print(f"\nwritten to {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
    return 0


def _flush_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url).flushdb()
    except redis.RedisError:
        pass


if __name__ == "__main__":
    sys.exit(main())
