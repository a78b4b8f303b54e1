"""Large files are parsed in a forked child process (``_ParsedInChild``): the same outcomes,
report, progress and file errors as the reader thread, and a child that dies, fails or is
left behind fails the import clearly (never a hang, never rows lost), with real processes."""

import os
import signal
import subprocess
import threading
import time

import pytest

from bench.stack import celery_worker_argv
from users import csv_import
from users.csv_import import ParserProcessDied
from users.models import EndUser, ImportJob, ImportStatus

from .conftest import ROOT, WorkerProcess, database_url_for_subprocess, requires_broker, wait_until
from .csv_helpers import csv_bytes, identify, run_import
from .test_csv_import_pipeline import awkward_rows, file_with_a_decoding_error_mid_way, full_report, masked_sample

pytestmark = pytest.mark.django_db


@pytest.fixture
def children(monkeypatch):
    """Every file parsed in a child (whatever its size); the children started, for the test."""
    started: list[csv_import._ParsedInChild] = []

    class Recorded(csv_import._ParsedInChild):
        def __enter__(self):
            started.append(self)
            return super().__enter__()

    monkeypatch.setattr(csv_import, "_CHILD_MIN_ROWS", 0)
    monkeypatch.setattr(csv_import, "_ParsedInChild", Recorded)
    return started


def is_reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def reader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "import-reader"]


def test_the_child_gives_the_same_report_and_progress_as_the_reader_thread(tenant, other_tenant, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 4)
    for workspace in (tenant.workspace, other_tenant.workspace):
        identify(workspace, "u3", name="Existing", email="e3@example.com")
    rows = awkward_rows(60)
    rows[8] = {"user_id": "b8", "billing_id": "cus_B8", "name": ""}  # a cleared and an unset field
    rows[9] = {"kana_id": "12x"}
    data = csv_bytes(rows)

    progress_thread: list[tuple[int, int]] = []
    threaded = run_import(tenant.workspace, data, progress=lambda *p: progress_thread.append(p))
    monkeypatch.setattr(csv_import, "_CHILD_MIN_ROWS", 0)
    progress_child: list[tuple[int, int]] = []
    forked = run_import(other_tenant.workspace, data, progress=lambda *p: progress_child.append(p))

    assert threaded.status == forked.status == ImportStatus.DONE
    assert threaded.counts() == forked.counts()
    assert full_report(threaded) == full_report(forked)
    assert masked_sample(threaded) == masked_sample(forked)
    assert progress_thread == progress_child == [(min(n, 60), 60) for n in range(4, 64, 4)]


def test_rows_parsed_in_the_child_are_applied_as_the_threads_are(tenant, children, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 7)
    rows = [
        {"user_id": f"u{i}", "name": f"N{i}", "email": f"u{i}@example.com", "billing_id": f"cus_{i}" if i % 2 else ""}
        for i in range(30)
    ]

    job = run_import(tenant.workspace, csv_bytes(rows))

    assert job.status == ImportStatus.DONE and job.applied and job.counts()["created"] == 30
    stored = {u.user_id: u for u in EndUser.objects.for_workspace(tenant.workspace)}
    assert stored["u3"].name == "N3" and stored["u3"].email == "u3@example.com" and stored["u3"].billing_id == "cus_3"
    assert stored["u4"].billing_id in ("", None)
    assert len(children) == 1 and is_reaped(children[0].pid)
    assert children[0].exit_status == 0 or os.WIFSIGNALED(children[0].exit_status)


def test_a_decoding_error_found_by_the_child_fails_as_in_the_thread(tenant, other_tenant, children, monkeypatch):
    data, bad, rows_before_its_block = file_with_a_decoding_error_mid_way(monkeypatch)
    progress: list[tuple[int, int]] = []

    job = run_import(tenant.workspace, data, progress=lambda *p: progress.append(p))

    assert job.status == ImportStatus.FAILED and job.error_code == "unsupported_encoding"
    assert "line 27" in job.error and f"byte {bad}" in job.error
    assert progress == [(n, 40) for n in range(3, rows_before_its_block + 1, 3)]
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 0
    assert len(children) == 1 and is_reaped(children[0].pid) and not reader_threads()
    # The same file through the reader thread fails with the same message.
    monkeypatch.setattr(csv_import, "_CHILD_MIN_ROWS", 10**9)
    threaded = run_import(other_tenant.workspace, data)
    assert (threaded.error_code, threaded.error) == (job.error_code, job.error)


def test_a_killed_child_fails_the_import_and_changes_nothing(tenant, children, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 50)
    # 200 chunks: far more than the pipe and the queue hold, so the child is still parsing.
    data = csv_bytes([{"user_id": f"u{i}", "email": f"u{i}@example.com"} for i in range(10_000)])
    progress: list[int] = []

    def kill_after_the_first_chunk(processed, total):
        progress.append(processed)
        if processed == 50:
            os.kill(children[0].pid, signal.SIGKILL)

    started = time.monotonic()
    with pytest.raises(ParserProcessDied, match="killed by signal 9 before the end of the file"):
        run_import(tenant.workspace, data, progress=kill_after_the_first_chunk, run_inline=True)

    assert time.monotonic() - started < 30
    assert progress[0] == 50 and progress[-1] < 10_000
    job = ImportJob.objects.get(workspace=tenant.workspace)
    assert job.status == ImportStatus.FAILED and job.error_code == "import_failed"
    assert "ParserProcessDied" in job.error and job.rows_processed < 10_000
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 0
    assert is_reaped(children[0].pid) and not reader_threads()


def test_an_exception_in_the_child_fails_the_import_with_its_message(tenant, children, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 10)
    real_parse = csv_import._parse_row

    def broken_at_row_35(number, cells, header):
        if number == 35:
            raise ValueError("parser bug")
        return real_parse(number, cells, header)

    monkeypatch.setattr(csv_import, "_parse_row", broken_at_row_35)  # the child is forked with it

    with pytest.raises(ParserProcessDied, match="ValueError: parser bug"):
        run_import(tenant.workspace, csv_bytes([{"user_id": f"u{i}"} for i in range(100)]))

    job = ImportJob.objects.get(workspace=tenant.workspace)
    assert job.status == ImportStatus.FAILED and job.error_code == "import_failed"
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 0
    assert is_reaped(children[0].pid)


def test_a_failure_in_the_import_kills_and_reaps_the_child(tenant, children, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 50)
    real_apply = csv_import.apply_profile_rows
    calls = []

    def failing_on_the_second_chunk(**kwargs):
        calls.append(len(kwargs["rows"]))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_apply(**kwargs)

    monkeypatch.setattr(csv_import, "apply_profile_rows", failing_on_the_second_chunk)

    with pytest.raises(RuntimeError, match="boom"):
        run_import(tenant.workspace, csv_bytes([{"user_id": f"u{i}"} for i in range(10_000)]), run_inline=True)

    assert calls == [50, 50]
    assert ImportJob.objects.get(workspace=tenant.workspace).status == ImportStatus.FAILED
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 0
    # Still parsing when the import stopped: killed, not left to finish, and reaped.
    assert is_reaped(children[0].pid) and os.WIFSIGNALED(children[0].exit_status)
    assert not reader_threads()


def test_a_child_that_dies_while_its_pipe_stays_open_is_noticed(tenant, children, monkeypatch, tmp_path):
    """Another process forked from the parent may hold the pipe's write end, so the child's
    death gives no end of file: the reader notices it by polling and fails, never hangs."""
    monkeypatch.setattr(csv_import, "_CHILD_POLL_SECONDS", 0.1)
    holder_pid_file = tmp_path / "holder"

    def dies_leaving_its_pipe_open(source, writable):
        holder = os.fork()
        if holder == 0:
            time.sleep(30)
            os._exit(0)
        holder_pid_file.write_text(str(holder))
        os._exit(3)

    monkeypatch.setattr(csv_import, "_parse_in_child", dies_leaving_its_pipe_open)
    started = time.monotonic()
    try:
        with pytest.raises(ParserProcessDied, match="exited with status 3"):
            run_import(tenant.workspace, csv_bytes([{"user_id": f"u{i}"} for i in range(20)]))
        assert time.monotonic() - started < 10
    finally:
        if holder_pid_file.exists():
            os.kill(int(holder_pid_file.read_text()), signal.SIGKILL)
    assert ImportJob.objects.get(workspace=tenant.workspace).status == ImportStatus.FAILED


def test_the_child_exits_by_itself_when_its_reader_is_gone(tenant):
    """The parent killed (a worker's hard time limit): the pipe loses its reader, and the
    child's next write fails, so it does not outlive the import."""
    data = csv_bytes([{"user_id": f"u{i}", "name": "x" * 100} for i in range(20_000)])
    import io

    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(readable)
        csv_import._parse_in_child(io.BytesIO(data), writable)
    os.close(writable)
    assert os.read(readable, 4)  # it has started sending
    os.close(readable)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child kept running without a reader")
    assert os.waitstatus_to_exitcode(status) == 1


def session_grandchildren(leader: int) -> set[int]:
    """Processes of the worker's session whose parent is neither the worker nor init: the
    children of its prefork task processes."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent, session = int(fields[1]), int(fields[3])
        if session == leader and int(entry) != leader and parent not in (leader, 1):
            found.add(int(entry))
    return found


@requires_broker
def test_a_large_import_is_parsed_in_a_child_of_a_prefork_worker(tenant, transactional_db, settings):
    """Celery's prefork task processes are daemonic (``multiprocessing`` may not start children
    there); the import forks its parser all the same, and the job is done exactly."""
    import redis

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    worker = WorkerProcess(settings.REDIS_URL)
    worker.log_path.parent.mkdir(exist_ok=True)
    worker.log = open(worker.log_path, "w")
    env = {**os.environ, "DATABASE_URL": database_url_for_subprocess(), "REDIS_URL": settings.REDIS_URL}
    worker.process = subprocess.Popen(
        celery_worker_argv(loglevel="INFO", concurrency=2),
        cwd=ROOT,
        env=env,
        stdout=worker.log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        settings.KANA_CSV_INLINE_MAX_ROWS = 100
        rows = csv_import._CHILD_MIN_ROWS + 2000
        data = csv_bytes([{"user_id": f"w{i}", "email": f"w{i}@example.com"} for i in range(rows)])
        job = run_import(tenant.workspace, data)
        assert job.status == ImportStatus.QUEUED
        parsers: set[int] = set()

        def finished():
            parsers.update(session_grandchildren(worker.process.pid))
            return ImportJob.objects.get(pk=job.pk).status in (ImportStatus.DONE, ImportStatus.FAILED)

        wait_until(finished, timeout=120, interval=0.02, message=f"import done; worker log:\n{worker.output()}")
        job.refresh_from_db()
        assert job.status == ImportStatus.DONE and job.applied, (job.error, worker.output())
        assert job.counts()["created"] == rows == EndUser.objects.for_workspace(tenant.workspace).count()
        assert parsers, "no parsing child seen under the worker's task processes"
        assert not session_grandchildren(worker.process.pid)  # reaped
    finally:
        worker.stop()


def test_the_import_thread_rebuilds_the_childs_rows_not_the_reader_thread(tenant, children, monkeypatch):
    """The reader thread only reads and unpickles: rebuilding a chunk's rows there held the
    interpreter lock whenever one of the import's statements returned (round 16)."""
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 4)
    rebuilt_in = set()
    rebuild = csv_import._rows_from_child

    def recorded(flat):
        rebuilt_in.add(threading.current_thread().name)
        return rebuild(flat)

    monkeypatch.setattr(csv_import, "_rows_from_child", recorded)

    job = run_import(tenant.workspace, csv_bytes([{"user_id": f"u{n}"} for n in range(10)]))

    assert job.applied and job.counts()["created"] == 10
    assert len(children) == 1
    assert rebuilt_in == {threading.current_thread().name}
