"""Helpers for the CSV tests: building files, importing them, reading the database back."""

import csv
import io
from datetime import UTC, datetime

from django.utils import timezone

from users import bulk, services
from users.csv_export import export_users_csv
from users.csv_format import COLUMNS
from users.csv_import import import_users_csv
from users.models import EndUser, MergeRecord, UserIdentity
from users.profile import validated_changes

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def csv_bytes(rows, header=COLUMNS, *, bom: bool = False) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if header is not None:
        writer.writerow(header)
    for row in rows:
        if isinstance(row, dict):
            row = [row.get(column, "") for column in header]
        writer.writerow(row)
    data = buffer.getvalue().encode()
    return b"\xef\xbb\xbf" + data if bom else data


def run_import(workspace, data: bytes, *, dry_run: bool = False, **options):
    return import_users_csv(workspace=workspace, file=io.BytesIO(data), dry_run=dry_run, actor="test", **options)


def export_text(workspace, **options) -> str:
    return "".join(export_users_csv(workspace=workspace, **options))


def export_rows(workspace) -> list[dict]:
    return list(csv.DictReader(io.StringIO(export_text(workspace))))


def identify(workspace, user_id, *, at=None, **fields):
    changes, problems = validated_changes(**fields)
    assert not problems
    return services.identify_user(
        workspace=workspace, user_id=user_id, changes=changes, occurred_at=at or timezone.now()
    ).user


def bare(workspace, *, at=None, **fields):
    changes, problems = validated_changes(**fields)
    assert not problems
    return services.upsert_user_by_email(workspace=workspace, changes=changes, occurred_at=at or timezone.now()).user


def snapshot(workspace) -> dict:
    """Everything the import may change, to compare before and after."""
    users = {
        u["id"]: u for u in EndUser.objects.for_workspace(workspace).values("id", "created_at", *bulk.PROFILE_COLUMNS)
    }
    identities = sorted(UserIdentity.objects.for_workspace(workspace).values_list("external_id", "user_id"))
    merges = MergeRecord.objects.for_workspace(workspace).count()
    return {"users": users, "identities": identities, "merges": merges}


def result_rows(job) -> list[tuple]:
    return [(row["row"], row["result"], row["code"]) for row in job.sample]
