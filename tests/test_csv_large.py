"""Large files: 50 MB streamed with flat memory; large imports through a real worker."""

import io
import os
import time

import pytest
from django.core.files.uploadedfile import TemporaryUploadedFile

from users.csv_import import import_users_csv
from users.models import EndUser, ImportJob, ImportStatus

from .conftest import requires_broker, requires_postgres, wait_until
from .csv_helpers import csv_bytes

FIFTY_MB = 50 * 1024 * 1024
CAN_MEASURE_PEAK = os.access("/proc/self/clear_refs", os.W_OK)


def memory_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_memory() -> None:
    # Linux: writing 5 resets the process's peak RSS (VmHWM) to its current RSS.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def write_big_file(path, target_bytes: int) -> int:
    """A users CSV of about ``target_bytes`` (long names), written a block at a time."""
    rows = 0
    padding = "x" * 380
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("kana_id,user_id,name,email,billing_id,billing_provider,created_at,flags\r\n")
        written = 0
        while written < target_bytes:
            block = "".join(
                f',big-{i},"Name {i} {padding}",user{i}@example.com,cus_{i},,2024-01-01T00:00:00+00:00,\r\n'
                for i in range(rows, rows + 10_000)
            )
            out.write(block)
            written += len(block)
            rows += 10_000
    return rows


# ~120,000 rows: about a minute on PostgreSQL (COPY paths), twice that on SQLite, whose
# embedded use is not for files this size.
@requires_postgres
@pytest.mark.skipif(not CAN_MEASURE_PEAK, reason="measures peak memory through Linux's /proc/self/clear_refs")
@pytest.mark.django_db
def test_a_50_mb_file_is_imported_streamed(tenant, tmp_path):
    source = tmp_path / "big.csv"
    rows = write_big_file(source, FIFTY_MB)
    assert source.stat().st_size >= FIFTY_MB
    # What a Django upload of this size is: a temporary file, read from disk.
    upload = TemporaryUploadedFile("big.csv", "text/csv", source.stat().st_size, "utf-8")
    with source.open("rb") as data:
        while chunk := data.read(1 << 20):
            upload.write(chunk)
    upload.seek(0)

    baseline = memory_kb("VmRSS")
    reset_peak_memory()
    started = time.monotonic()
    try:
        job = import_users_csv(workspace=tenant.workspace, file=upload, dry_run=False, actor="test", run_inline=True)
    finally:
        upload.close()  # storage moved the temporary file; closing it is what Django does after a request
    elapsed = time.monotonic() - started
    grown_mb = (memory_kb("VmHWM") - baseline) / 1024

    assert job.status == ImportStatus.DONE and job.applied, job.error
    assert job.rows_total == rows and job.counts()["created"] == rows
    assert EndUser.objects.for_workspace(tenant.workspace).count() == rows
    # Streamed: the process never held the file (50 MB as bytes, more as text), the report or
    # all rows at once. What grows with the file is the set of users already named (to find
    # duplicate rows), ~150 bytes a row.
    assert grown_mb < 60, f"peak memory grew by {grown_mb:.0f} MB"
    assert len(job.sample) == 1000
    print(f"50 MB, {rows:,} rows in {elapsed:.1f} s, peak memory +{grown_mb:.0f} MB")


@requires_broker
def test_a_large_import_runs_in_a_real_worker_with_progress(tenant, celery_worker, settings):
    settings.KANA_CSV_INLINE_MAX_ROWS = 100
    data = csv_bytes([{"user_id": f"w{i}", "email": f"w{i}@example.com"} for i in range(5000)])

    job = import_users_csv(workspace=tenant.workspace, file=io.BytesIO(data), dry_run=False, actor="test")

    assert job.status == ImportStatus.QUEUED and job.rows_total == 5000
    seen = set()

    def finished():
        current = ImportJob.objects.get(pk=job.pk)
        seen.add((current.status, current.rows_processed))
        return current.status in (ImportStatus.DONE, ImportStatus.FAILED)

    wait_until(finished, timeout=120, interval=0.05, message=f"import done; worker log:\n{celery_worker.output()}")
    job.refresh_from_db()
    assert job.status == ImportStatus.DONE and job.applied, (job.error, celery_worker.output())
    assert job.rows_processed == 5000 and job.counts()["created"] == 5000
    assert job.started_at and job.finished_at and job.report_path
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 5000
    assert ImportStatus.RUNNING in {status for status, _ in seen}  # polled while the worker ran it
