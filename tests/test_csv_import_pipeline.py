"""The import reads and parses the file in a thread ahead of its chunks (``_ParsedAhead``):
the same outcomes, report, progress and errors as reading it in the import's own thread,
in file order, with a bounded number of chunks waiting."""

import csv
import io
import threading
import time

import pytest

from users import csv_import
from users.csv_import import open_import_report
from users.models import EndUser, ImportJob, ImportStatus

from .csv_helpers import csv_bytes, identify, run_import

pytestmark = pytest.mark.django_db


class _ParsedInline:
    """The form before the reader thread: each chunk read and parsed when the import asks."""

    def __init__(self, rows, header):
        self.chunks = csv_import._parsed_chunks(rows, header)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def __iter__(self):
        return self.chunks


def awkward_rows(count: int) -> list[dict]:
    """userIds named again across chunks (the later row is the duplicate), invalid values and
    rows with no identifier at various lines."""
    rows = []
    for i in range(count):
        if i % 11 == 5:
            rows.append({"user_id": f"x{i}", "email": "not-an-email"})
        elif i % 13 == 7:
            rows.append({"name": "Nobody"})
        else:
            rows.append({"user_id": f"u{i % 17}", "name": f"N{i}", "email": f"n{i}@example.com"})
    return rows


def full_report(job) -> list[list[str]]:
    """The report file, kana_ids replaced by the order in which they first appear."""
    seen: dict[str, str] = {}
    rows = list(csv.reader(io.TextIOWrapper(open_import_report(job), encoding="utf-8")))
    return [[*row[:4], seen.setdefault(row[4], str(len(seen))) if row[4] else "", row[5]] for row in rows]


def masked_sample(job) -> list[dict]:
    return [{**row, "kana_id": bool(row["kana_id"])} for row in job.sample]


def test_the_reader_thread_gives_the_same_report_as_reading_inline(tenant, other_tenant, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 4)
    for workspace in (tenant.workspace, other_tenant.workspace):
        identify(workspace, "u3", name="Existing", email="e3@example.com")
    data = csv_bytes(awkward_rows(60))

    progress_threaded: list[tuple[int, int]] = []
    threaded = run_import(tenant.workspace, data, progress=lambda *p: progress_threaded.append(p))
    monkeypatch.setattr(csv_import, "_ParsedAhead", _ParsedInline)
    progress_inline: list[tuple[int, int]] = []
    inline = run_import(other_tenant.workspace, data, progress=lambda *p: progress_inline.append(p))

    assert threaded.status == inline.status == ImportStatus.DONE
    assert threaded.counts() == inline.counts()
    assert full_report(threaded) == full_report(inline)
    assert masked_sample(threaded) == masked_sample(inline)
    assert progress_threaded == progress_inline == [(min(n, 60), 60) for n in range(4, 64, 4)]


def test_rows_are_decided_in_file_order_across_chunks(tenant, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 3)
    rows = awkward_rows(50)

    job = run_import(tenant.workspace, csv_bytes(rows))

    # What file order gives: the first row naming a userId creates it, a later one is a duplicate.
    expected, named = [], set()
    for number, row in enumerate(rows, start=2):
        if "user_id" not in row:
            expected.append((str(number), "error", "missing_identifier"))
        elif row.get("email") == "not-an-email":
            expected.append((str(number), "error", "invalid_email"))
        elif row["user_id"] in named:
            expected.append((str(number), "error", "duplicate_row"))
        else:
            named.add(row["user_id"])
            expected.append((str(number), "created", ""))
    assert [(r[0], r[1], r[3]) for r in full_report(job)[1:]] == expected
    assert [row["row"] for row in job.sample] == sorted(row["row"] for row in job.sample)
    assert not job.applied and EndUser.objects.for_workspace(tenant.workspace).count() == 0


def file_with_a_decoding_error_mid_way(monkeypatch) -> tuple[bytes, int, int]:
    """40 rows whose 26th (line 27) is not UTF-8, read in chunks of 3 rows and blocks of 64
    bytes, the up-front check told it is fine: (the file, the bad byte's offset, the rows
    before the block that holds it)."""
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 3)
    monkeypatch.setattr(csv_import, "_READ_BLOCK_BYTES", 64)
    monkeypatch.setattr(csv_import, "scan_csv", lambda binary: 40)
    rows = [{"user_id": f"u{i}", "name": f"N{i}"} for i in range(40)]
    rows[25]["name"] = "Zoë"
    data = csv_bytes(rows).replace("Zoë".encode(), "Zoë".encode("cp1252"))
    bad = data.index(b"\xeb")
    return data, bad, data[: bad // 64 * 64].count(b"\n") - 1


def test_a_decoding_error_mid_file_fails_after_the_chunks_before_it(tenant, monkeypatch):
    """The file changed between the check and the run (or the check was wrong): the error
    arrives where the rows stop, after the whole chunks before it, as when read inline."""
    data, bad, rows_before_its_block = file_with_a_decoding_error_mid_way(monkeypatch)
    progress: list[tuple[int, int]] = []

    job = run_import(tenant.workspace, data, progress=lambda *p: progress.append(p))

    assert job.status == ImportStatus.FAILED and job.error_code == "unsupported_encoding"
    assert "line 27" in job.error and f"byte {bad}" in job.error
    assert rows_before_its_block >= 6
    assert progress == [(n, 40) for n in range(3, rows_before_its_block + 1, 3)]
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 0
    assert not _reader_threads()


def test_a_failure_mid_chunk_stops_the_reader_and_changes_nothing(tenant, monkeypatch):
    import gc

    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 3)
    real_apply = csv_import.apply_profile_rows
    calls = []

    def failing_on_the_second_chunk(**kwargs):
        calls.append(len(kwargs["rows"]))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_apply(**kwargs)

    monkeypatch.setattr(csv_import, "apply_profile_rows", failing_on_the_second_chunk)
    frozen = gc.get_freeze_count()

    with pytest.raises(RuntimeError):
        run_import(tenant.workspace, csv_bytes([{"user_id": f"u{i}"} for i in range(60)]))

    assert calls == [3, 3]
    job = ImportJob.objects.get(workspace=tenant.workspace)
    assert job.status == ImportStatus.FAILED and job.error_code == "import_failed"
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 0
    assert not _reader_threads()  # it was waiting to hand over a chunk: it stopped
    assert gc.get_freeze_count() == frozen


def test_the_reader_parses_ahead_while_a_chunk_is_applied_and_stays_within_its_bound(tenant, monkeypatch):
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 10)
    real_parse = csv_import._parse_row
    parsed = []

    def counted(number, cells, header):
        parsed.append(number)
        return real_parse(number, cells, header)

    monkeypatch.setattr(csv_import, "_parse_row", counted)
    seen_during_the_first_chunk = []
    most = 10 * (1 + csv_import._CHUNKS_AHEAD + 1)  # the import's, the queued ones, the one waiting

    def progress(processed, total):
        if processed == 10:
            deadline = time.monotonic() + 5
            while len(parsed) < most and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # room for a reader that would run further ahead
            seen_during_the_first_chunk.append(len(parsed))

    job = run_import(tenant.workspace, csv_bytes([{"user_id": f"u{i}"} for i in range(200)]), progress=progress)

    assert job.status == ImportStatus.DONE and job.counts()["created"] == 200
    assert seen_during_the_first_chunk == [most]
    assert parsed == list(range(2, 202))


def _reader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "import-reader"]


def test_the_collector_is_paused_during_the_import_and_collects_garbage_every_few_chunks(tenant, monkeypatch):
    """Python's cyclic collector is off while the import runs (its passes walked every
    object a chunk keeps alive, 8-10 µs a row) and runs after every
    ``_CHUNKS_PER_YOUNG_PASS``-th chunk (and after a chunk with an error row), when the
    chunks' objects are released: cyclic garbage waits at most that many chunks, so memory
    stays bounded; and the collector is on again afterwards."""
    import gc
    import weakref

    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", 1)
    every = csv_import._CHUNKS_PER_YOUNG_PASS
    real_apply = csv_import.apply_profile_rows
    cycles: list[weakref.ref] = []
    alive_at_start: list[int] = []
    enabled_during: list[bool] = []

    class Node:
        pass

    def making_a_cycle_per_chunk(**kwargs):
        alive_at_start.append(sum(ref() is not None for ref in cycles))
        enabled_during.append(gc.isenabled())
        node = Node()
        node.self = node  # garbage as soon as this call returns, but only the collector frees it
        cycles.append(weakref.ref(node))
        return real_apply(**kwargs)

    monkeypatch.setattr(csv_import, "apply_profile_rows", making_a_cycle_per_chunk)
    assert gc.isenabled()
    chunks = 2 * every + 3
    job = run_import(tenant.workspace, csv_bytes([{"user_id": f"u{i}"} for i in range(chunks)]))
    assert job.status == ImportStatus.DONE and job.created == chunks
    assert enabled_during == [False] * chunks
    # The garbage of the chunks since the last pass, never more than the interval's.
    assert alive_at_start == [chunk % every for chunk in range(chunks)]
    assert gc.isenabled()


def test_the_collector_is_on_again_after_a_failed_import(tenant, monkeypatch):
    import gc

    def broken(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(csv_import, "apply_profile_rows", broken)
    with pytest.raises(RuntimeError):
        run_import(tenant.workspace, csv_bytes([{"user_id": "u1"}]))
    assert gc.isenabled()
    gc.disable()
    try:
        run_import(tenant.workspace, csv_bytes([{"user_id": "u2"}]))  # raises too
    except RuntimeError:
        pass
    finally:
        enabled = gc.isenabled()
        gc.enable()
    assert not enabled  # a caller's disabled collector is left as it was
