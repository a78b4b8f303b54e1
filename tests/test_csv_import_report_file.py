"""The import's full report file lists every row, in file order, with its result, code,
kana_id and note, the rows after the sample's first 1,000 as fully as the first ones: a plain
created row there is written by a shorter path (``_Report.add_chunk``), every other outcome
(an update, a created row with a note, an error) by the general one."""

import csv
import io

import pytest

from users.csv_import import REPORT_SAMPLE_ROWS, open_import_report
from users.models import EndUser

from .csv_helpers import csv_bytes, identify, run_import
from .test_csv_import import make_ambiguous

pytestmark = pytest.mark.django_db

CREATED_FIRST = REPORT_SAMPLE_ROWS + 150  # past the sample, across two chunks


def report_lines(job) -> list[dict]:
    with open_import_report(job) as binary:
        return list(csv.DictReader(io.TextIOWrapper(binary, encoding="utf-8", newline="")))


def rows_after_the_sample():
    """Plain creates, then an update, a created row flagged same_email, and more creates."""
    rows = [{"user_id": f"new-{i}", "name": f"New {i}"} for i in range(CREATED_FIRST)]
    rows.append({"user_id": "known", "name": "Renamed"})  # row CREATED_FIRST + 2
    rows.append({"user_id": "u9", "email": "x@example.com"})  # + 3: created, flagged
    rows += [{"user_id": f"late-{i}", "name": f"Late {i}"} for i in range(5)]  # + 4 … + 8
    return rows


def test_rows_after_the_sample_keep_their_results_notes_and_ids(tenant):
    workspace = tenant.workspace
    make_ambiguous(workspace)
    known = identify(workspace, "known", name="Known")
    job = run_import(workspace, csv_bytes(rows_after_the_sample()), run_inline=True)

    assert job.applied and job.counts() == {
        "created": CREATED_FIRST + 6,
        "updated": 1,
        "merged": 0,
        "unchanged": 0,
        "error": 0,
    }
    lines = report_lines(job)
    assert [int(line["row"]) for line in lines] == list(range(2, CREATED_FIRST + 9))
    ids = dict(EndUser.objects.for_workspace(workspace).values_list("user_id", "pk"))
    by_row = {int(line["row"]): line for line in lines}
    for i in (0, REPORT_SAMPLE_ROWS - 1, REPORT_SAMPLE_ROWS, CREATED_FIRST - 1):
        assert by_row[i + 2] == {
            "row": str(i + 2),
            "result": "created",
            "error": "",
            "code": "",
            "kana_id": str(ids[f"new-{i}"]),
            "note": "",
        }
    assert by_row[CREATED_FIRST + 2] == {
        "row": str(CREATED_FIRST + 2),
        "result": "updated",
        "error": "",
        "code": "",
        "kana_id": str(known.pk),
        "note": "",
    }
    flagged = by_row[CREATED_FIRST + 3]
    assert (flagged["result"], flagged["kana_id"]) == ("created", str(ids["u9"]))
    assert "flagged same_email" in flagged["note"]
    assert [by_row[CREATED_FIRST + 4 + i]["kana_id"] for i in range(5)] == [str(ids[f"late-{i}"]) for i in range(5)]


def test_an_error_after_the_sample_is_reported_in_place_and_nothing_is_applied(tenant):
    workspace = tenant.workspace
    rows = [{"user_id": f"new-{i}"} for i in range(CREATED_FIRST)]
    rows.append({"user_id": "bad", "email": "not an email"})
    rows.append({"user_id": "after"})
    job = run_import(workspace, csv_bytes(rows), run_inline=True)

    assert not job.applied
    assert job.counts()["created"] == CREATED_FIRST + 1 and job.counts()["error"] == 1
    lines = report_lines(job)
    assert [line["result"] for line in lines[-3:]] == ["created", "error", "created"]
    assert (lines[-2]["row"], lines[-2]["code"]) == (str(CREATED_FIRST + 2), "invalid_email")
    assert not EndUser.objects.for_workspace(workspace).filter(user_id__startswith="new-").exists()
    assert [row["row"] for row in job.sample if row["result"] == "error"] == [CREATED_FIRST + 2]
