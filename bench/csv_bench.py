"""S5: CSV import of 100,000 users and export of 1,000,000 users (BENCH.md).

    DATABASE_URL=postgres://... python bench/csv_bench.py [--import-rows 100000] [--export-rows 1000000]

Creates its own workspaces in the given database (and deletes them afterwards), then prints
rows/s for: an import creating users (userId, name, email), the re-import of their export
with billing ids filled in (updates), the re-import of an unchanged export, and the export
of --export-rows users, in a child process whose peak RSS is reported.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kana.settings")
os.environ.setdefault("KANA_DEBUG", "0")
os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret")
os.environ.setdefault("LOG_LEVEL", "WARNING")

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402

from kana.models import Workspace  # noqa: E402
from users.csv_export import export_users_csv  # noqa: E402
from users.csv_import import import_users_csv  # noqa: E402


def timed_import(workspace, data: bytes, label: str) -> dict:
    started, cpu = time.perf_counter(), time.process_time()
    job = import_users_csv(workspace=workspace, file=io.BytesIO(data), dry_run=False, actor="bench", run_inline=True)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert job.status == "done" and job.applied, (job.status, job.error, job.counts())
    rows = job.rows_total
    print(
        f"import {label:<28} {rows:>9,} rows {seconds:7.2f} s {rows / seconds:>10,.0f} rows/s "
        f"(this process's CPU {cpu:.2f} s) {job.counts()}"
    )
    return {
        "scenario": f"import {label}",
        "rows": rows,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rows_per_s": rows / seconds,
    }


def analyze() -> None:
    """What autovacuum does a little later: without it the planner believes the workspace
    created a second ago has no users and scans it all for each chunk's lookups."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE users_enduser, users_useridentity")


def export_bytes(workspace) -> bytes:
    return "".join(export_users_csv(workspace=workspace)).encode()


def load_users(workspace_id: int, count: int) -> None:
    """Insert ``count`` users set-based (the export is measured, not the load)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                """
                INSERT INTO users_enduser (workspace_id, user_id, name, email, email_key, billing_id,
                    billing_provider, audiences, created_at, updated_at, name_set_at, email_set_at)
                SELECT %s, 'user-' || g, 'Name ' || g, 'User' || g || '@example.com', 'user' || g || '@example.com',
                    CASE WHEN g %% 3 = 0 THEN '' ELSE 'cus_' || g END,
                    CASE WHEN g %% 3 = 0 THEN '' ELSE 'stripe' END,
                    '{}', now() + g * interval '1 microsecond', now(), now(), now()
                FROM generate_series(1, %s) AS g
                """,
                [workspace_id, count],
            )
            # Every 50th user shares its email with the next one: same_email flags to compute.
            cursor.execute(
                "UPDATE users_enduser SET email_key = 'shared' || (id / 2) || '@example.com' "
                "WHERE workspace_id = %s AND id %% 50 IN (0, 1)",
                [workspace_id],
            )
            cursor.execute("ANALYZE users_enduser")
        else:
            raise SystemExit("the export benchmark loads its users with PostgreSQL's generate_series")


def child_export(workspace_id: int) -> None:
    workspace = Workspace.objects.get(pk=workspace_id)
    started = time.perf_counter()
    rows = -1
    size = 0
    with open(os.devnull, "wb") as sink:
        for piece in export_users_csv(workspace=workspace):
            data = piece.encode()
            size += len(data)
            rows += data.count(b"\n")
            sink.write(data)
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork/exec.
    status = Path("/proc/self/status").read_text()
    peak_mb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
    print(json.dumps({"rows": rows, "seconds": seconds, "bytes": size, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--import-rows", type=int, default=100_000)
    parser.add_argument("--export-rows", type=int, default=1_000_000)
    parser.add_argument("--child-export", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_export:
        child_export(args.child_export)
        return

    results = []
    workspace = Workspace.objects.create(name="bench-import")
    try:
        header = "user_id,name,email\n"
        lines = (f"user-{i},Name {i},user{i}@example.com\n" for i in range(args.import_rows))
        results.append(timed_import(workspace, (header + "".join(lines)).encode(), "(creates)"))
        analyze()
        exported = export_bytes(workspace).decode()
        filled = [exported.split("\r\n", 1)[0]]
        for line in exported.split("\r\n")[1:]:
            if line:
                cells = line.split(",")
                cells[4] = f"cus_{cells[0]}"
                filled.append(",".join(cells))
        results.append(timed_import(workspace, ("\r\n".join(filled) + "\r\n").encode(), "(billing ids: updates)"))
        results.append(timed_import(workspace, export_bytes(workspace), "(unchanged export)"))
    finally:
        workspace.delete()

    workspace = Workspace.objects.create(name="bench-export")
    try:
        started = time.perf_counter()
        load_users(workspace.pk, args.export_rows)
        print(f"loaded {args.export_rows:,} users in {time.perf_counter() - started:.1f} s")
        child = subprocess.run(
            [sys.executable, __file__, "--child-export", str(workspace.pk)],
            check=True,
            capture_output=True,
            text=True,
            env=os.environ,
        )
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        rate = figures["rows"] / figures["seconds"]
        print(
            f"export {figures['rows']:>9,} rows {figures['seconds']:7.2f} s {rate:>10,.0f} rows/s  "
            f"{figures['bytes'] / 1e6:.0f} MB, peak RSS {figures['peak_rss_mb']:.0f} MB"
        )
        results.append({"scenario": "export", **figures, "rows_per_s": rate})
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM users_enduser WHERE workspace_id = %s", [workspace.pk])
        workspace.delete()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
