"""The paused collector's young passes during an import (``_older_objects_frozen``): after
every ``_CHUNKS_PER_YOUNG_PASS``-th chunk, and after each chunk with an error row."""

import gc

import pytest

from users import csv_import

from .csv_helpers import run_import

pytestmark = pytest.mark.django_db

CHUNK = 5


@pytest.fixture
def young_passes(monkeypatch):
    """Each young pass the import asks for (the collector paused): the objects it freed."""
    monkeypatch.setattr(csv_import, "IMPORT_CHUNK_ROWS", CHUNK)
    passes = []

    def record(phase, info):
        if phase == "stop" and info["generation"] == 0 and not gc.isenabled():
            passes.append(info["collected"])

    gc.callbacks.append(record)
    yield passes
    gc.callbacks.remove(record)


def _file(rows: list[str]) -> bytes:
    return ("user_id,name,email\n" + "\n".join(rows) + "\n").encode()


def test_chunks_without_errors_are_swept_every_few_chunks(tenant, young_passes):
    chunks = 3 * csv_import._CHUNKS_PER_YOUNG_PASS + 1
    job = run_import(tenant.workspace, _file([f"u{i},N {i},u{i}@example.com" for i in range(chunks * CHUNK)]))
    assert job.status == "done" and job.applied and job.counts()["created"] == chunks * CHUNK
    # What makes the interval safe: chunks of rows that apply leave no cyclic garbage.
    assert young_passes == [0, 0, 0]


def test_each_chunk_with_an_error_row_is_swept_and_its_cycles_freed(tenant, young_passes):
    rows = []
    for i in range(4 * CHUNK):
        # One bad email per chunk: a row error of the parse.
        rows.append(f"u{i},N {i},u{i}@example.com" if i % CHUNK else f"u{i},N {i},not an email")
    job = run_import(tenant.workspace, _file(rows))
    assert job.status == "done" and not job.applied and job.counts()["error"] == 4
    assert len(young_passes) == 4
