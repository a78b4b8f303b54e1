"""CSV import of users, through the identity service (``users.services``) like Identify calls.

Services (what the dashboard, the REST API and ``manage.py import_users`` call):

    import_users_csv(*, workspace: Workspace, file: BinaryIO, dry_run: bool, actor: str,
                     file_name: str = "", run_inline: bool | None = None,
                     progress: Callable[[int, int], None] | None = None) -> ImportJob
        Checks the file (encoding, header; raises CsvFileError, nothing stored), records an
        ImportJob, and runs it: in this process when it has at most
        settings.KANA_CSV_INLINE_MAX_ROWS rows (or ``run_inline`` is True), else in a Celery
        worker, enqueued on commit (eager in the embedded default: it has then run already).
        The returned job is ``done``/``failed`` when it ran here, else ``queued``.

    run_import_job(*, job_id: int, progress: Callable[[int, int], None] | None = None) -> ImportJob
        Runs a queued job (the Celery task and the management command call it).

    import_report(job: ImportJob) -> dict
        SPEC §9's import report: {"id", "status", "dry_run", "applied", "counts", "rows",
        "rows_total", "rows_processed", "error"}; ``rows`` holds at most REPORT_SAMPLE_ROWS
        rows, errors first; a row is {"row", "result", "error", "code", "kana_id", "note",
        "changes"} (``changes``: the fields an updated or merged row changed). The full
        report is a file: ``open_import_report(job)``.

    open_import_report(job: ImportJob) -> BinaryIO | None
        The full per-row report, CSV ``row,result,error,code,kana_id,note`` (UTF-8).

Rows: ``kana_id`` -> ``update_user``; else ``user_id`` -> ``identify_user``; else the email ->
``upsert_user_by_email`` (set-based twins in ``apply_profile_rows``). Only kana_id, user_id,
name, email and billing_id are read; an empty cell leaves the field as it is. The row time
(``occurred_at``) is the import's start. Results: created, updated (claims included, noted),
merged, unchanged, or error. A user named by two rows is an error on the second.

All or nothing: the whole file is applied in one transaction; a dry run, or any row error,
rolls it back, so a dry run reports exactly what applying would do. Nothing is held per row
(the users already named, for duplicate rows, are a temporary table on PostgreSQL): the file is read twice as a
stream (a check, then the import), counts and a bounded sample are kept, the full report is
streamed to a temporary file and then to storage. The import reads and parses the file ahead
of its chunks: in a thread, or for large files in a forked child process (``_parsed_ahead``).
"""

import codecs
import csv
import gc
import io
import logging
import os
import pickle
import queue
import select
import signal
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import BinaryIO

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import DatabaseError, Error, connection, transaction
from django.utils import timezone

from kana import audit, jobs
from kana.db import kept_cursor
from kana.errors import DomainError
from kana.locks import lock_keys
from kana.models import Workspace

from .bulk import count_created_users_for_the_planner
from .csv_format import COLUMNS, READ_COLUMNS, unescape_cell
from .errors import IdentityError
from .identifiers import InvalidIdentifier, clean_identifier
from .identity import (
    IdentifyOutcome,
    IdentifyResult,
    ProfileRow,
    TouchedUsers,
    apply_profile_rows,
    build_new_users,
    suppressed_user_ids,
)
from .models import ImportJob, ImportStatus, MergeReason
from .profile import UNSET, ProfileChanges, validated_changes

logger = logging.getLogger(__name__)

# Rows per call of the identity service: its reads and writes are a few statements per
# chunk, and a chunk's rows and users are in memory at once (~1 MB for 1,000 rows).
IMPORT_CHUNK_ROWS = 1000
# Report rows kept in the job (and answered by the API); the full report is a file.
REPORT_SAMPLE_ROWS = 1000
REPORT_COLUMNS = ("row", "result", "error", "code", "kana_id", "note")
_READ_BLOCK_BYTES = 1 << 20
_PROGRESS_SECONDS = 1.0
_HEADER_HINT = ",".join(COLUMNS)

_RESULTS = {
    IdentifyOutcome.CREATED: "created",
    IdentifyOutcome.UPDATED: "updated",
    IdentifyOutcome.CLAIMED: "updated",
    IdentifyOutcome.MERGED: "merged",
    IdentifyOutcome.UNCHANGED: "unchanged",
}
_ERROR_CODES = {"unknown_user": "unknown_kana_id"}


# The Celery task that runs an ImportJob (users/tasks.py), by name.
IMPORT_TASK = "users.tasks.run_import"


class CsvFileError(DomainError):
    """The file as a whole cannot be imported (encoding, header, empty): nothing is changed."""


# --- Reading the file ------------------------------------------------------------------


class _Utf8Lines:
    """A binary file as text lines for ``csv.reader``: strict UTF-8, a leading BOM skipped.

    Splits on CR, LF and CRLF only (what ``csv`` expects with ``newline=""``), so quoted
    newlines reach the parser intact. Anything that is not UTF-8 stops with a CsvFileError
    naming the byte offset and line.
    """

    def __init__(self, binary: BinaryIO):
        self.binary = binary
        self.bytes_read = 0
        self.newlines = 0  # LFs decoded before the current block, for line numbers

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        carry = ""
        first = True
        while True:
            block = self.binary.read(_READ_BLOCK_BYTES)
            final = not block
            if first:
                block = self._check_start(block)
                first = False
            nul = block.find(b"\x00")
            if nul >= 0:
                raise CsvFileError(
                    "unsupported_encoding",
                    f"the file has a NUL byte at byte {self.bytes_read + nul} (line {self._line_at(block, nul)}): "
                    "it looks like UTF-16 or a binary file; save it as CSV UTF-8",
                )
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as exc:
                raise self._decode_error(exc, pending) from None
            self.bytes_read += len(block)
            self.newlines += text.count("\n")
            text = carry + text
            if final:
                if text:
                    yield from io.StringIO(text, newline="")
                return
            lines = io.StringIO(text, newline="").readlines()
            # The last line may continue in the next block (a CR may be the first half of CRLF).
            carry = lines.pop() if lines and not lines[-1].endswith("\n") else ""
            yield from lines

    def _check_start(self, block: bytes) -> bytes:
        if block.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise CsvFileError(
                "unsupported_encoding", "the file is UTF-16 encoded; save it as CSV UTF-8 (with or without BOM)"
            )
        if block.startswith(codecs.BOM_UTF8):
            self.bytes_read = len(codecs.BOM_UTF8)
            return block[len(codecs.BOM_UTF8) :]
        return block

    def _line_at(self, block: bytes, index: int) -> int:
        return self.newlines + block[:index].count(b"\n") + 1

    def _decode_error(self, exc: UnicodeDecodeError, pending: int) -> CsvFileError:
        offset = self.bytes_read - pending + exc.start
        line = self.newlines + exc.object[: exc.start].count(b"\n") + 1
        byte = exc.object[exc.start]
        return CsvFileError(
            "unsupported_encoding",
            f"the file is not UTF-8: byte 0x{byte:02X} at byte {offset} (line {line}) is not valid UTF-8 "
            "(Latin-1 or Windows-1252?); save the file as CSV UTF-8",
        )


@dataclass
class _Header:
    width: int
    index: dict[str, int]  # read column -> position


def _read_header(reader) -> _Header:
    try:
        first = next(reader, None)
    except csv.Error as exc:
        raise CsvFileError("malformed_csv", f"the header is not valid CSV: {exc}") from None
    if first is None or not any(cell.strip() for cell in first):
        raise CsvFileError("empty_file", f"the file is empty; the first row must be the header {_HEADER_HINT}")
    names = [cell.strip().lower() for cell in first]
    known = set(COLUMNS)
    if not known.intersection(names):
        shown = ",".join(first)[:80]
        raise CsvFileError("missing_header", f"the first row must be the header {_HEADER_HINT}; it is {shown!r}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise CsvFileError(
            "invalid_header",
            f"unknown column {unknown[0]!r} in the header; the columns are {_HEADER_HINT} "
            f"(only {', '.join(READ_COLUMNS)} are read)",
        )
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated:
        raise CsvFileError("invalid_header", f"the column {repeated!r} appears twice in the header")
    if not {"kana_id", "user_id", "email"}.intersection(names):
        raise CsvFileError("invalid_header", "the header needs at least one of kana_id, user_id, email")
    return _Header(width=len(names), index={name: names.index(name) for name in READ_COLUMNS if name in names})


def _records(binary: BinaryIO) -> tuple[_Header, Iterator[tuple[int, list[str]]]]:
    """The header, then (row number, cells) for each non-blank record; the header is row 1."""
    lines = _Utf8Lines(binary)
    reader = csv.reader(lines, strict=True)
    header = _read_header(reader)

    def rows() -> Iterator[tuple[int, list[str]]]:
        number = 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise CsvFileError("malformed_csv", f"line {reader.line_num}: {exc}") from None
            number += 1
            if cells and any(cells):
                yield number, cells

    return header, rows()


def scan_csv(binary: BinaryIO) -> int:
    """Check a whole file (encoding, header, CSV syntax) and count its data rows."""
    _header, rows = _records(binary)
    return sum(1 for _ in rows)


# --- Rows ------------------------------------------------------------------------------


@dataclass
class _RowError:
    code: str
    message: str


def _parse_row(number: int, cells: list[str], header: _Header) -> ProfileRow | _RowError:
    if len(cells) != header.width:
        return _RowError("wrong_field_count", f"the row has {len(cells)} fields, the header {header.width}")

    def cell(name: str) -> str:
        position = header.index.get(name)
        return unescape_cell(cells[position]).strip() if position is not None else ""

    kana_id = cell("kana_id")
    if kana_id and not kana_id.isdigit():
        return _RowError("invalid_kana_id", f"kana_id {kana_id!r} is not a Kana user id (a whole number)")
    try:
        user_id = clean_identifier(cell("user_id"), "user_id")
    except InvalidIdentifier as exc:
        return _RowError("invalid_user_id", exc.message)
    changes, problems = validated_changes(
        name=cell("name") or UNSET, email=cell("email") or UNSET, billing_id=cell("billing_id") or UNSET
    )
    if problems:
        return _RowError(problems[0].code, "; ".join(p.message for p in problems))
    user_pk = int(kana_id) if kana_id else None
    return ProfileRow(changes=changes, user_pk=user_pk, user_id=user_id, label=f"row {number}")


# --- The report ------------------------------------------------------------------------


class _Report:
    """Counts, a bounded sample (errors first) and the full report streamed to a temp file."""

    def __init__(self):
        self.counts = {"created": 0, "updated": 0, "merged": 0, "unchanged": 0, "error": 0}
        self.errors: list[dict] = []
        self.others: list[dict] = []
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.text = io.TextIOWrapper(self.file, encoding="utf-8", newline="")
        self.writer = csv.writer(self.text)
        self.writer.writerow(REPORT_COLUMNS)

    def add_chunk(self, parsed: list, applied: list, occurred_at: datetime) -> None:
        """A chunk's rows in file order: ``parsed`` as the chunk came, (row number, ProfileRow
        or _RowError), and ``applied``, the outcomes of its ProfileRows in the same order.

        Its lines go to the file in one ``writerows``. A plain created row (no note, nothing
        changed to list), the bulk of a large import, is only counted and written once the
        sample has its rows: the general path's notes, changes and sample checks cost more
        than the line (≈ 1.4 µs a row against ≈ 0.7; docs/performance-history.md, "Round 17").
        """
        outcomes = iter(applied)
        lines = []
        plain_created = 0
        sampled = len(self.others) >= REPORT_SAMPLE_ROWS
        for number, row in parsed:
            outcome = next(outcomes) if isinstance(row, ProfileRow) else row
            if (
                sampled
                and type(outcome) is IdentifyResult
                and outcome.outcome == IdentifyOutcome.CREATED
                and not outcome.ambiguous
                and not outcome.absorbed_ids
            ):
                plain_created += 1
                lines.append((number, "created", "", "", outcome.user.pk, ""))
            else:
                lines.append(self._line_of(number, outcome, occurred_at))
        self.counts["created"] += plain_created
        self.writer.writerows(lines)

    def _line_of(self, number: int, outcome, occurred_at: datetime) -> tuple:
        if isinstance(outcome, _RowError):
            return self._counted(number, "error", code=outcome.code, error=outcome.message)
        if isinstance(outcome, IdentityError):
            code = _ERROR_CODES.get(outcome.code, outcome.code)
            return self._counted(number, "error", code=code, error=outcome.message)
        changes = _changed_fields(outcome, occurred_at)
        return self._counted(
            number, _RESULTS[outcome.outcome], kana_id=outcome.user.pk, note=_note(outcome), changes=changes
        )

    def _counted(self, number: int, result: str, *, kana_id=None, code="", error="", note="", changes=()) -> tuple:
        """Count a row and keep it in the sample while there is room; its line of the file."""
        self.counts[result] += 1
        kept = self.errors if result == "error" else self.others
        if len(kept) < REPORT_SAMPLE_ROWS:
            kept.append(
                {
                    "row": number,
                    "result": result,
                    "error": error or None,
                    "code": code or None,
                    "kana_id": kana_id,
                    "note": note or None,
                    "changes": list(changes),
                }
            )
        return (number, result, error, code, kana_id or "", note)

    def sample(self) -> list[dict]:
        room = REPORT_SAMPLE_ROWS - len(self.errors)
        return sorted(self.errors + self.others[:room], key=lambda row: row["row"])

    def save(self, job: ImportJob) -> str:
        self.text.flush()
        self.file.seek(0)
        name = f"imports/{job.workspace_id}/report-{job.pk}-{uuid.uuid4().hex}.csv"
        name = default_storage.save(name, File(self.file))
        self.close()
        return name

    def close(self) -> None:
        if not self.text.closed:
            self.text.close()


# A CSV row stamps a field (``*_set_at`` = the import's time) only when it changes its value.
_STAMPED_FIELDS = (("name", "name_set_at"), ("email", "email_set_at"), ("billing_id", "billing_set_at"))


def _changed_fields(result: IdentifyResult, occurred_at: datetime) -> list[str]:
    """The profile fields a row changed on an existing user (created users: none listed)."""
    if result.outcome in (IdentifyOutcome.CREATED, IdentifyOutcome.UNCHANGED):
        return []
    return [name for name, stamp in _STAMPED_FIELDS if getattr(result.user, stamp) == occurred_at]


def _note(result: IdentifyResult) -> str:
    notes = []
    if result.outcome == IdentifyOutcome.CLAIMED:
        notes.append("claimed the user without a userId that has this email")
    if result.absorbed_ids:
        notes.append("merged kana_id " + ", ".join(str(pk) for pk in result.absorbed_ids) + " into this user")
    if result.ambiguous:
        notes.append("the email matches several users, one without a userId: not merged, flagged same_email")
    return "; ".join(notes)


# --- Services --------------------------------------------------------------------------


def import_users_csv(
    *,
    workspace: Workspace,
    file: BinaryIO,
    dry_run: bool,
    actor: str,
    file_name: str = "",
    run_inline: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    row_by_row: bool = False,
) -> ImportJob:
    """Check and record an import, then run it here or in a worker (see the module docstring).

    ``row_by_row`` applies rows through the per-row services instead of their set-based
    twin (same results, slower): for verification.
    """
    if hasattr(file, "seek"):
        file.seek(0)
    # A Django upload kept in a temporary file is moved into storage, not copied.
    content = file if isinstance(file, File) else File(file)
    source_path = default_storage.save(f"imports/{workspace.pk}/upload-{uuid.uuid4().hex}.csv", content)
    try:
        with default_storage.open(source_path, "rb") as stored:
            total = scan_csv(stored)
    except CsvFileError:
        default_storage.delete(source_path)
        raise
    job = ImportJob.objects.create(
        workspace=workspace,
        dry_run=dry_run,
        actor=actor[:255],
        file_name=(file_name or getattr(file, "name", "") or "")[:255],
        source_path=source_path,
        rows_total=total,
    )
    inline = run_inline if run_inline is not None else total <= settings.KANA_CSV_INLINE_MAX_ROWS
    if inline:
        return run_import_job(job_id=job.pk, progress=progress, row_by_row=row_by_row)
    jobs.enqueue_on_commit(IMPORT_TASK, job.pk)
    job.refresh_from_db()  # in the embedded default (eager tasks) it has run by now
    return job


def _claim(job_id: int, workspace_limit: int | None = None) -> bool:
    """queued -> running; a running job whose heartbeat stopped (its worker died) is re-run.
    Never two runners at once: an import is one transaction from its first row to its last.

    With ``workspace_limit``, not while that many other imports of the workspace are running:
    the job stays queued (the task sends it again a little later).
    """
    if workspace_limit is None:
        return jobs.claim(ImportJob, job_id, take_over_running=False)
    claimed = jobs.claim_within_limit(ImportJob, job_id, take_over_running=False, workspace_limit=workspace_limit)
    return claimed == jobs.Claim.CLAIMED


class _Heartbeat:
    """Writes a running job's progress from its own thread and database connection.

    The import's transaction stays open to the end, so its own writes are invisible until
    then. SQLite allows one writer at a time and the import is it: there progress is only
    written at the end.
    """

    def __init__(self, job_id: int):
        self.job_id = job_id
        self.processed = 0
        self.stopped = threading.Event()
        self.thread = None
        if connection.vendor == "postgresql":
            self.thread = threading.Thread(target=self._run, name=f"import-{job_id}-progress", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        from django.db import connection as thread_connection

        try:
            while not self.stopped.wait(_PROGRESS_SECONDS):
                ImportJob.objects.filter(pk=self.job_id, status=ImportStatus.RUNNING).update(
                    rows_processed=self.processed, heartbeat_at=timezone.now()
                )
        except DatabaseError:
            logger.warning("import progress not written", extra={"job_id": self.job_id})
        finally:
            thread_connection.close()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()


def run_import_job(
    *,
    job_id: int,
    progress: Callable[[int, int], None] | None = None,
    row_by_row: bool = False,
    requeue_on: tuple[type[Exception], ...] = (),
    workspace_limit: int | None = None,
) -> ImportJob:
    """Run a queued import job to done or failed; returns the job as it is afterwards.

    An exception of a ``requeue_on`` type (the task's transient database errors) puts the job
    back to queued and propagates, for the caller's retry; any other failure is final.
    With ``workspace_limit``, a job whose workspace already runs that many imports is left
    queued (returned as such) for the caller to send again later.
    """
    if not _claim(job_id, workspace_limit):
        return ImportJob.objects.get(pk=job_id)
    job = ImportJob.objects.select_related("workspace").get(pk=job_id)
    try:
        _run(job, progress, row_by_row)
    except CsvFileError as exc:
        _fail(job_id, exc.code, exc.message)
    except requeue_on:
        ImportJob.objects.filter(pk=job_id, status=ImportStatus.RUNNING).update(status=ImportStatus.QUEUED)
        raise
    except Exception as exc:
        logger.exception("import job failed", extra={"job_id": job_id})
        _fail(job_id, "import_failed", f"the import failed and changed nothing ({type(exc).__name__})")
        raise
    job = ImportJob.objects.get(pk=job_id)
    if job.status in (ImportStatus.DONE, ImportStatus.FAILED) and job.source_path:
        default_storage.delete(job.source_path)
    return job


def _fail(job_id: int, code: str, message: str) -> None:
    ImportJob.objects.filter(pk=job_id).exclude(status=ImportStatus.DONE).update(
        status=ImportStatus.FAILED, error_code=code, error=message[:2000], finished_at=timezone.now()
    )


def _run(job: ImportJob, progress, row_by_row: bool) -> None:
    """The import in one transaction of its own, at the top level: its rows, its audit entry
    and the job's ``done`` commit together, or nothing does.

    At the top level, not in a savepoint: PostgreSQL frees the deferred checks' trigger events
    that ``SET CONSTRAINTS ALL IMMEDIATE`` has fired only outside a subtransaction (one could
    still roll back). In a savepoint every chunk's checks walked the events of every chunk
    before it, kept to the end: PostgreSQL's CPU a row grew with the import (21 µs a row at its
    start, 53 at its millionth row; docs/performance-history.md, "Round 21: s5grow").

    A dry run, or an import with a row error, rolls that transaction back; the job's ``done``
    and report are then written in a second one. Between the two another runner of the same
    job (a redelivery) may take the job's lock and apply the file again: it reaches the same
    answer, and whichever writes ``done`` first is the one kept (``_finish`` writes only a
    running job).
    """
    occurred_at = timezone.now()
    apply = partial(apply_profile_rows, one_at_a_time=row_by_row)
    report = _Report()
    heartbeat = _Heartbeat(job.pk)
    touched = TouchedUsers()
    processed = 0
    unswept = 0  # chunks done since the collector's last young pass
    try:
        with transaction.atomic():
            if not _still_running(job):
                return
            with default_storage.open(job.source_path, "rb") as source, _older_objects_frozen():
                with _parsed_ahead(source, job.rows_total) as chunks, _ChecksPerChunk() as checks:
                    for parsed in chunks:
                        # What needs nothing read is done while PostgreSQL still checks the
                        # previous chunk: the chunk's userIds, and the users its rows would
                        # create (build_new_users: the engine's only per-row work without a read).
                        to_apply = [row for _, row in parsed if isinstance(row, ProfileRow)]
                        named = {row.user_id for row in to_apply if row.user_id}
                        new_users = (
                            None
                            if row_by_row
                            else build_new_users(workspace=job.workspace, rows=to_apply, occurred_at=occurred_at)
                        )
                        checks.wait()  # the previous chunk's, before this chunk's first statement
                        errors_before = report.counts["error"]
                        parsed, to_apply, new_users = _refuse_suppressed(
                            job.workspace, parsed, to_apply, named, new_users
                        )
                        applied_rows = (
                            apply(
                                workspace=job.workspace,
                                rows=to_apply,
                                occurred_at=occurred_at,
                                touched=touched,
                                reason=MergeReason.CSV,
                                actor=job.actor,
                                new_users=new_users,
                            )
                            if to_apply
                            else []
                        )
                        processed += len(parsed)
                        heartbeat.processed = processed
                        if progress:  # before the checks are sent: it may use the connection
                            progress(processed, job.rows_total)
                        if not job.dry_run and not report.counts["error"]:
                            # A dry run, or an import that already has an error row, is
                            # rolled back: its checks would never run.
                            checks.fire(created=report.counts["created"] + _created_in(applied_rows))
                        report.add_chunk(parsed, applied_rows, occurred_at)
                        # The chunk's rows, users and outcomes released, the paused collector
                        # walks what the chunks left (_older_objects_frozen says why here):
                        # after a chunk with an error row, else every few chunks.
                        del parsed, to_apply, new_users, applied_rows
                        unswept += 1
                        if report.counts["error"] != errors_before or unswept == _CHUNKS_PER_YOUNG_PASS:
                            gc.collect(0)
                            unswept = 0
            rolled_back = job.dry_run or bool(report.counts["error"])
            if rolled_back:
                transaction.set_rollback(True)
            else:
                # In the import's transaction: an import that fails later leaves no entry.
                summary = {"file_name": job.file_name, "rows": processed, **report.counts}
                audit.record(job.workspace, job.actor, "csv.apply", job.pk, after=summary)
                _finish(job, report, heartbeat, processed, applied=True)
        if rolled_back:
            with transaction.atomic():
                if _still_running(job):
                    _finish(job, report, heartbeat, processed, applied=False)
    finally:
        heartbeat.stop()
        report.close()


def _still_running(job: ImportJob) -> bool:
    """Takes the job's lock for the rest of the transaction: two runners of one job (a
    redelivery racing a slow worker) take turns, and the second finds it done."""
    lock_keys([f"csv-import:{job.pk}"])
    return ImportJob.objects.filter(pk=job.pk, status=ImportStatus.RUNNING).exists()


def _finish(job: ImportJob, report: "_Report", heartbeat: _Heartbeat, processed: int, *, applied: bool) -> None:
    heartbeat.stop()
    report_path = report.save(job)
    ImportJob.objects.filter(pk=job.pk).update(
        status=ImportStatus.DONE,
        applied=applied,
        rows_processed=processed,
        created=report.counts["created"],
        updated=report.counts["updated"],
        merged=report.counts["merged"],
        unchanged=report.counts["unchanged"],
        errors=report.counts["error"],
        sample=report.sample(),
        report_path=report_path,
        heartbeat_at=timezone.now(),
        finished_at=timezone.now(),
    )


def _created_in(outcomes: list) -> int:
    return sum(1 for o in outcomes if isinstance(o, IdentifyResult) and o.outcome == IdentifyOutcome.CREATED)


class _ChecksPerChunk:
    """The import's deferred foreign-key checks run after each chunk, while this thread
    reports the chunk and takes the next, instead of all at COMMIT.

    Each row a chunk creates queues two checks (the user's workspace, the identity's user):
    ≈ 6-7 µs of PostgreSQL a created row, which at COMMIT ran after everything else, with
    nothing to overlap them. ``SET CONSTRAINTS ALL IMMEDIATE`` checks every row queued so
    far (PostgreSQL applies it retroactively) and ``SET CONSTRAINTS ALL DEFERRED`` puts the
    constraints back as Django made them (every deferrable constraint of the schema is
    initially deferred: tests/test_csv_import_checks_per_chunk.py pins it). Both are sent
    without waiting (``kana.db.kept_cursor.send_unawaited``) and read back before the next
    chunk's first statement. The same checks, on the same rows: only when they run changes.
    A failed check fails the import there, as it failed its COMMIT, and nothing is applied.

    The checks' plans are made on the users' statistics as they are when they run, so
    ``count_created_users_for_the_planner`` looks at them first (see its docstring: a table
    analysed empty made each check walk every user created so far).
    """

    def __init__(self):
        self.pending = kept_cursor.Unawaited()
        self.planner_checked_at = 0  # users created when the statistics were last looked at

    def __enter__(self) -> "_ChecksPerChunk":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
            return
        # Leaving on a failure: the connection is read back to a usable state for the
        # rollback; a failed check then is not the error to report.
        try:
            self.wait()
        except Error:
            pass

    def fire(self, *, created: int) -> None:
        if connection.vendor != "postgresql":
            return  # SQLite has no SET CONSTRAINTS: its checks stay at COMMIT
        if created > 2 * self.planner_checked_at:
            # Looked at again each time the import has doubled: a plan goes wrong only when the
            # planner takes the table for (nearly) empty, not for half its size (a round trip a
            # chunk was ≈ 0.7 µs a row).
            count_created_users_for_the_planner(created)
            self.planner_checked_at = created
        self.pending = kept_cursor.send_unawaited(["SET CONSTRAINTS ALL IMMEDIATE", "SET CONSTRAINTS ALL DEFERRED"])

    def wait(self) -> None:
        self.pending.wait()


def _refuse_suppressed(
    workspace: Workspace,
    parsed: list[tuple[int, "ProfileRow | _RowError"]],
    to_apply: list[ProfileRow],
    named: set[str],
    new_users: list | None,
) -> tuple[list, list[ProfileRow], list | None]:
    """A row naming a deleted user's userId is an error, as a Segment message naming it is
    ``suppressed``: an import does not bring back a user that was deleted on request (one
    indexed lookup per chunk of the userIds it ``named``). Lifting the suppression lets the
    row in. The chunk with those rows as errors, and its rows still ``to_apply`` with their
    ``new_users`` (``build_new_users``; None stays None)."""
    suppressed = suppressed_user_ids(workspace=workspace, user_ids=named)
    if not suppressed:
        return parsed, to_apply, new_users
    refused = [
        (
            number,
            _RowError(
                "user_suppressed",
                f"user_id {row.user_id!r} belongs to a deleted user and is suppressed "
                "(lift it with DELETE /api/v1/suppressions/{id} to import it)",
            )
            if isinstance(row, ProfileRow) and row.user_id in suppressed
            else row,
        )
        for number, row in parsed
    ]
    kept = [row.user_id not in suppressed for row in to_apply]
    to_apply = [row for row, keep in zip(to_apply, kept, strict=True) if keep]
    if new_users is not None:
        new_users = [user for user, keep in zip(new_users, kept, strict=True) if keep]
    return refused, to_apply, new_users


# Chunks between two young passes of the collector when they report no error: a pass walks
# the chunks parsed ahead whatever the interval, and a chunk without errors leaves no
# garbage for it (_older_objects_frozen), so a pass per chunk cost ≈ 1-5 µs a row for nothing.
_CHUNKS_PER_YOUNG_PASS = 8


@contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """The cyclic garbage collector kept off the import's live objects until it ends: the
    objects that existed before it are frozen (``gc.freeze``), and the collector is paused;
    ``_run`` collects the youngest generation after a chunk, when that chunk's rows, users
    and outcomes have been released: after every ``_CHUNKS_PER_YOUNG_PASS``-th chunk, and
    after any chunk with an error row.

    A chunk allocates tens of thousands of objects that live until it ends (rows, users,
    results). Frozen, Django's and the app's objects are skipped by every pass (round 6:
    full passes over them cost 8-16 µs of CPU a row). Running, the collector still passed
    over each chunk's live objects again and again: a young pass per 700 allocations,
    promoting them, then the middle generation's passes walking them again (8-10 µs a row of
    100,000, 132 middle passes). After the chunk, only the chunks parsed ahead are alive:
    a young pass walks each object about once (2-3 µs a row). Cyclic garbage among the
    objects made since the last pass is collected by it, so memory stays bounded (objects
    alive at a pass, the chunks parsed ahead, are plain rows without cycles). A chunk of rows
    that apply leaves no cyclic garbage (round 13: every young pass of a 10,000-row import of
    creates freed 0 objects, walking the ≈ 5,000 objects of the chunks parsed ahead for
    0.6-4 ms). A chunk with an error row is still swept at once, as a precaution (errors
    are exceptions, whose tracebacks can hold cycles; none was found in the round 13 tests),
    and any other garbage waits at most ``_CHUNKS_PER_YOUNG_PASS`` chunks. Measured earlier and not kept: pausing
    during each chunk and collecting while its objects were still alive saved nothing. The
    caller's collector state and the frozen objects are given back at the end, even a failed
    import's.
    """
    gc.freeze()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.unfreeze()


def _parsed_chunks(rows: Iterator[tuple[int, list[str]]], header: _Header) -> Iterator[list]:
    """The file's rows parsed, a chunk at a time: [(row number, ProfileRow | _RowError)]."""
    for chunk in _chunks(rows, IMPORT_CHUNK_ROWS):
        yield [(number, _parse_row(number, cells, header)) for number, cells in chunk]


# Parsed chunks waiting for the import: enough to keep it busy, few enough for the memory
# bound (a parsed chunk is about 1 MB).
_CHUNKS_AHEAD = 2
_PUT_POLL_SECONDS = 0.1
_DONE = object()


class _ParsedAhead:
    """The file's parsed chunks, read, decoded and parsed in a thread ahead of the import.

    The import waits for PostgreSQL for much of each chunk (with the interpreter lock
    released), and the machine has a second core: meanwhile this thread reads and parses the
    next chunks. It never touches the database, so every decision that does stays in the
    import's thread, in file order. Chunks arrive in file order; a failure reading the file
    (bad UTF-8 at line N, broken CSV) arrives in its place and is raised there, after the
    chunks before it and before any row after it, as when the import read the file itself.
    At most ``_CHUNKS_AHEAD`` parsed chunks wait (the memory bound); leaving the ``with``
    stops the thread and waits for it, so the file is not closed under it.
    """

    def __init__(self, rows: Iterator[tuple[int, list[str]]], header: _Header):
        self.queue: queue.Queue = queue.Queue(maxsize=_CHUNKS_AHEAD)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(rows, header), name="import-reader", daemon=True)

    def __enter__(self) -> "_ParsedAhead":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join()

    def __iter__(self) -> Iterator[list]:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _read(self, rows: Iterator[tuple[int, list[str]]], header: _Header) -> None:
        try:
            for item in _parsed_chunks(rows, header):
                if not self._put(item):
                    return
        except BaseException as exc:  # raised in the import's thread, where the rows stop
            self._put(exc)
        else:
            self._put(_DONE)

    def _put(self, item) -> bool:
        """Queue one item; False once the import has stopped reading (it failed or ended)."""
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=_PUT_POLL_SECONDS)
            except queue.Full:
                continue
            return True
        return False


# Files of at least this many rows are parsed in a child process (_ParsedInChild); smaller
# ones in the reader thread, where a fork (a few ms) and the rows' hand-over would not pay.
_CHILD_MIN_ROWS = 10 * IMPORT_CHUNK_ROWS


def _parsed_ahead(source: BinaryIO, rows_total: int) -> "_ParsedAhead":
    """The file's parsed chunks, in file order, read ahead of the import (see both classes)."""
    if rows_total >= _CHILD_MIN_ROWS and hasattr(os, "fork"):
        return _ParsedInChild(source)
    header, rows = _records(source)
    return _ParsedAhead(rows, header)


# A frame from the child: its length, then a pickled tuple whose first item is its kind.
_FRAME_LENGTH = struct.Struct("<I")
_ROWS, _FILE_ERROR, _FAILED, _END = "rows", "file_error", "failed", "end"
_CHILD_POLL_SECONDS = 1.0


class ParserProcessDied(RuntimeError):
    """The child process parsing an import's file stopped before the file's end."""


class _ParsedInChild(_ParsedAhead):
    """The file read, decoded and parsed in a forked child process, its chunks handed back
    through a pipe; the parent's reader thread reads and unpickles each chunk and queues it,
    and the import's thread rebuilds its rows as it takes it.

    Why a process: the reader thread's parse (≈ 11 µs a row) holds the interpreter lock the
    import's thread needs between its statements; a child parses on the machine's other core,
    and the parent only unpickles plain tuples (the reader thread) and builds the rows (≈ 2.5
    µs a row, the import's thread). Forked, not spawned: the child starts in milliseconds with
    the code and settings already loaded and shares the parent's pages, and ``os.fork``
    (unlike ``multiprocessing``) is allowed in Celery's daemonic prefork workers. The child
    runs only the parse (no database, no lock another thread of the parent could hold, no
    imports) and always leaves by ``os._exit``, so nothing of the parent (its database
    connection, its atexit hooks) runs twice.

    Failures keep the thread's promises: a bad file (bad UTF-8 at line N, broken CSV) comes
    back as its CsvFileError in place of the chunk it stopped; any other exception in the
    child, or the child's death (killed, out of memory) is a ParserProcessDied there, never
    a hang and never a silently shorter file: the reader checks the child is alive every
    ``_CHILD_POLL_SECONDS`` while it waits, and only the end frame ends the chunks. Leaving
    the ``with`` kills and reaps the child; if the parent dies first, the child's next
    write fails (the pipe has no reader) and it exits. Memory: the child holds the chunk it
    parses and the pipe's 64 KB; the parent's bound is the thread's.
    """

    def __init__(self, source: BinaryIO):
        self.queue: queue.Queue = queue.Queue(maxsize=_CHUNKS_AHEAD)
        self.stopped = threading.Event()
        self.source = source
        self.pid = 0
        self.exit_status: int | None = None
        self.reaped = threading.Lock()  # held while the child is reaped: once, by one thread
        self.thread = threading.Thread(target=self._receive, name="import-reader", daemon=True)

    def __enter__(self) -> "_ParsedInChild":
        readable, writable = os.pipe()
        try:
            self.pid = os.fork()
        except OSError:
            os.close(readable)
            os.close(writable)
            raise
        if self.pid == 0:  # the child
            os.close(readable)
            _parse_in_child(self.source, writable)  # never returns
        os.close(writable)
        self.readable = readable
        self.poller = select.poll()  # not select.select: a worker's descriptors may pass 1024
        self.poller.register(readable, select.POLLIN)
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        with self.reaped:
            if self.exit_status is None:
                os.kill(self.pid, signal.SIGKILL)  # done, or the import stopped early
        self.thread.join()
        self._reap(block=True)
        os.close(self.readable)

    def __iter__(self) -> Iterator[list]:
        # The rows are rebuilt here, in the import's thread, not in the reader thread: there the
        # rebuild (≈ 2.5 µs a row) held the interpreter lock whenever one of the import's
        # statements returned, and the import waited for it (docs/performance-history.md, "Round 16:
        # s5pg"); here it runs while PostgreSQL checks the previous chunk (_ChecksPerChunk).
        for flat in super().__iter__():
            yield _rows_from_child(flat)

    def _reap(self, *, block: bool) -> bool:
        """Reap the child if it has exited (or wait for it with ``block``); True once reaped."""
        with self.reaped:
            if self.exit_status is None:
                pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
                if pid == 0:
                    return False
                self.exit_status = status
        return True

    def _receive(self) -> None:
        try:
            while True:
                (length,) = _FRAME_LENGTH.unpack(self._read_exactly(_FRAME_LENGTH.size))
                frame = pickle.loads(self._read_exactly(length))
                kind = frame[0]
                if kind == _ROWS:
                    if not self._put(frame[1]):  # rebuilt by the import's thread (__iter__)
                        return
                elif kind == _FILE_ERROR:
                    raise CsvFileError(frame[1], frame[2])
                elif kind == _FAILED:
                    raise ParserProcessDied(f"the import's parsing process failed: {frame[1]}")
                else:
                    break
        except BaseException as exc:  # raised in the import's thread, where the rows stop
            self._put(exc)
        else:
            self._put(_DONE)

    def _read_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            ready = self.poller.poll(_CHILD_POLL_SECONDS * 1000)
            if self.stopped.is_set():
                raise ParserProcessDied("the import stopped reading")
            if not ready:
                # Nothing for a while: a child that died while another process of the parent
                # kept the pipe's write end open (a fork in another thread) gives no EOF.
                if self._reap(block=False):
                    raise self._died()
                continue
            piece = os.read(self.readable, size - len(data))
            if not piece:
                self._reap(block=True)
                raise self._died()
            data += piece
        return bytes(data)

    def _died(self) -> ParserProcessDied:
        status = self.exit_status
        if status is not None and os.WIFSIGNALED(status):
            how = f"was killed by signal {os.WTERMSIG(status)}"
        else:
            how = f"exited with status {os.waitstatus_to_exitcode(status)}" if status is not None else "stopped"
        return ParserProcessDied(f"the import's parsing process {how} before the end of the file")


def _parse_in_child(source: BinaryIO, writable: int) -> None:
    """The child's whole life: parse the file, send its chunks, exit (never returns)."""
    status = 1
    try:
        # The parent paused its collector for the import (_older_objects_frozen); here the
        # rows rejected with an exception leave cycles, and nothing else is frozen in place.
        gc.enable()
        with open(writable, "wb", closefd=True) as out:

            def send(frame: tuple) -> None:
                blob = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
                out.write(_FRAME_LENGTH.pack(len(blob)))
                out.write(blob)
                out.flush()

            try:
                header, rows = _records(source)
                for chunk in _parsed_chunks(rows, header):
                    send((_ROWS, _rows_for_parent(chunk)))
            except CsvFileError as exc:
                send((_FILE_ERROR, exc.code, exc.message))
            except Exception as exc:
                send((_FAILED, f"{type(exc).__name__}: {exc}"[:500]))
            else:
                send((_END,))
        status = 0
    finally:
        os._exit(status)


# In a chunk sent to the parent, a field a row leaves alone (UNSET, which has no identity
# across processes); never a value a row can hold (a string or None).
_UNSET_IN_CHILD = False


def _rows_for_parent(chunk: list) -> list[tuple]:
    """Parsed rows as plain tuples: (number, code, message) for an error, else (number, name,
    email, billing_id, user_pk, user_id). Cheaper to pickle and to rebuild than the objects."""
    flat = []
    for number, row in chunk:
        if isinstance(row, _RowError):
            flat.append((number, row.code, row.message))
        else:
            changes = row.changes
            assert not changes.audiences, "a CSV row sets no audiences"
            flat.append(
                (
                    number,
                    _UNSET_IN_CHILD if changes.name is UNSET else changes.name,
                    _UNSET_IN_CHILD if changes.email is UNSET else changes.email,
                    _UNSET_IN_CHILD if changes.billing_id is UNSET else changes.billing_id,
                    row.user_pk,
                    row.user_id,
                )
            )
    return flat


def _rows_from_child(flat: list[tuple]) -> list:
    """The parsed rows again, as ``_parsed_chunks`` gives them (the inverse of ``_rows_for_parent``)."""
    rows = []
    for item in flat:
        if len(item) == 3:
            rows.append((item[0], _RowError(item[1], item[2])))
            continue
        number, name, email, billing_id, user_pk, user_id = item
        changes = ProfileChanges(
            name=UNSET if name is _UNSET_IN_CHILD else name,
            email=UNSET if email is _UNSET_IN_CHILD else email,
            billing_id=UNSET if billing_id is _UNSET_IN_CHILD else billing_id,
        )
        rows.append((number, ProfileRow(changes=changes, user_pk=user_pk, user_id=user_id, label=f"row {number}")))
    return rows


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- Reading results -------------------------------------------------------------------


def import_report(job: ImportJob) -> dict:
    """The import report of SPEC §9 (plus ids and progress); ``rows`` is a bounded sample."""
    body = {
        "id": job.pk,
        "status": job.status,
        "dry_run": job.dry_run,
        "applied": job.applied,
        "counts": job.counts(),
        "rows": job.sample,
        "rows_total": job.rows_total,
        "rows_processed": job.rows_processed,
        "file_name": job.file_name,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }
    if job.error_code:
        body["error"] = {"code": job.error_code, "message": job.error}
    return body


def open_import_report(job: ImportJob) -> BinaryIO | None:
    """The full per-row report as a binary file, or None while the job has none."""
    if not job.report_path:
        return None
    return default_storage.open(job.report_path, "rb")
