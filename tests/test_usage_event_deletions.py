"""No usage row outlives its event (migration features/0008: the usage's ``event_id`` has no
database constraint; docs/architecture.md, "Who writes which table").

Events are deleted in two places: ``ledger.forget_user`` (a user deleted with its events) and
a workspace's deletion (Django's collector). Usage is added to a stored event by reprocessing
and by the attribution of held anonymous events, both row-locking the event under the shared
rules lock, while the deletion may already have read which events and which usage to delete.
The race tests hold such a writer open in one process, start the deletion in another, let
the writer commit, and check that no usage is left pointing at a missing event.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest
from django.db import connection, transaction
from django.db.models import ProtectedError

from features.models import Event, EventStatus, Usage
from kana.models import Workspace
from users.models import EndUser
from users.services import delete_user

from .api_support import feature, rule
from .conftest import ROOT, SegmentClient, database_url_for_subprocess, make_tenant, requires_postgres, wait_until
from .usage_support import make_user, store_unmapped_events

EVENTS = 20


def orphan_usage() -> int:
    """Usage rows whose event is gone: what the dropped constraint would have refused."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM features_usage u"
            " WHERE NOT EXISTS (SELECT 1 FROM features_event e WHERE e.id = u.event_id)"
        )
        return cursor.fetchone()[0]


# --- Each deletion path, one at a time -------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("tasks_in_process")
def test_deleting_a_user_with_its_events_deletes_their_usage_whoever_wrote_it(django_capture_on_commit_callbacks):
    tenant = make_tenant()
    segment = SegmentClient(tenant)
    feature(tenant, "exports")
    segment.track("u1", "Sent", {"featureId": "exports"}, messageId="ingested")
    segment.track("u1", "Exported", messageId="stored")
    segment.track("u2", "Sent", {"featureId": "exports"}, messageId="other")
    with django_capture_on_commit_callbacks(execute=True):
        rule(tenant, "exports", "Exported")  # its job maps the stored event
    user = EndUser.objects.get(workspace=tenant.workspace, user_id="u1")
    assert Usage.objects.filter(user=user).count() == 2

    delete_user(workspace=tenant.workspace, user_pk=user.pk, events="delete")

    assert not Event.objects.filter(message_id__in=["ingested", "stored"]).exists()
    assert list(Usage.objects.values_list("event__message_id", flat=True)) == ["other"]
    assert orphan_usage() == 0


@pytest.mark.django_db
def test_a_workspace_whose_usage_outlived_its_user_is_still_protected():
    """Usage kept without a user (its user deleted, events kept) still refuses the workspace's
    deletion; a workspace with only such events (no usage) is deleted with them."""
    used, plain = make_tenant("Used"), make_tenant("Plain")
    feature(used, "exports")
    SegmentClient(used).track("u1", "Sent", {"featureId": "exports"})
    SegmentClient(plain).track("u1", "Sent")
    for tenant in (used, plain):
        user = EndUser.objects.get(workspace=tenant.workspace)
        delete_user(workspace=tenant.workspace, user_pk=user.pk, events="keep")

    with pytest.raises(ProtectedError), transaction.atomic():
        Workspace.objects.filter(pk=used.workspace.pk).delete()
    assert Usage.objects.get(workspace=used.workspace).user_id is None

    Workspace.objects.filter(pk=plain.workspace.pk).delete()
    assert not Event.objects.filter(workspace_id=plain.workspace.pk).exists()
    assert orphan_usage() == 0


# --- Races: a writer adding usage to stored events while they are being deleted ---------------

# One process per side, each with its own connection. ``map`` does what a reprocessing chunk
# (or an attribution of held anonymous events) does: the shared rules lock, then the flip of
# stored events with their usage (``ledger.map_events``), then waits for a line on stdin
# before committing. ``delete-workspace`` and ``delete-user`` delete as the admin and the API do.
_RACER = """
import json, sys
from decimal import Decimal
import django
django.setup()
from django.db import transaction
from features import ledger
from kana.locks import lock_rules_shared
from kana.models import Workspace
from users.services import delete_user
role, args = sys.argv[1], json.loads(sys.argv[2])
try:
    if role == "map":
        with transaction.atomic():
            lock_rules_shared(args["workspace"])
            usages = [(pk, args["feature"], None, Decimal(1)) for pk in args["events"]]
            print("mapped", ledger.map_events(args["workspace"], args["events"], usages), flush=True)
            sys.stdin.readline()
        print("committed", flush=True)
    elif role == "delete-workspace":
        Workspace.objects.get(pk=args["workspace"]).delete()
        print("deleted", flush=True)
    else:
        delete_user(workspace=Workspace.objects.get(pk=args["workspace"]), user_pk=args["user"], events="delete")
        print("deleted", flush=True)
except Exception as error:
    print("refused", type(error).__name__, flush=True)
"""


def _start(role: str, **args) -> tuple[subprocess.Popen, str]:
    name = f"evfk-{role}-{uuid.uuid4().hex[:8]}"  # its connection's application_name
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocess(),
        "DJANGO_SETTINGS_MODULE": "kana.settings",
        "KANA_DEBUG": "1",
        "PGAPPNAME": name,
    }
    process = subprocess.Popen(
        [sys.executable, "-c", _RACER, role, json.dumps(args)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, name


def _waits(application_name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND cardinality(pg_blocking_pids(pid)) > 0",
            [application_name],
        )
        return cursor.fetchone()[0] > 0


def _race(writer_args: dict, deleter_role: str, deleter_args: dict) -> tuple[str, str]:
    """The writer maps and holds; the deleter starts and must wait for it; the writer commits.
    Returns both outcomes (the writer's last line, the deleter's)."""
    writer, _ = _start("map", **writer_args)
    deleter = None
    try:
        assert writer.stdout.readline().split() == ["mapped", str(len(writer_args["events"]))]
        deleter, deleter_name = _start(deleter_role, **deleter_args)
        wait_until(lambda: _waits(deleter_name), timeout=60, message="the deletion waits for the writer")
        writer.stdin.write("\n")
        writer.stdin.flush()
        written, _ = writer.communicate(timeout=60)
        deleted, _ = deleter.communicate(timeout=60)
        return written.strip(), deleted.strip()
    finally:
        for process in (writer, deleter):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def _stored_events(tenant, *, detached: bool) -> tuple[EndUser, list[int]]:
    """Unmapped events of one user; ``detached``: that user then deleted with its events kept,
    so their usage will have no user (the one reference left that a deletion could trip on)."""
    user = make_user(tenant.workspace, "u1")
    specs = [("Exported", {"n": i}) for i in range(EVENTS)]
    events = store_unmapped_events(tenant.workspace, user, specs)
    if detached:
        delete_user(workspace=tenant.workspace, user_pk=user.pk, events="keep", suppress=False)
        assert not Event.objects.filter(workspace=tenant.workspace, user__isnull=False).exists()
    return user, [event.pk for event in events]


@requires_postgres
@pytest.mark.postgres
@pytest.mark.parametrize("detached", [False, True], ids=["events-of-a-user", "detached-events"])
def test_usage_written_while_its_workspace_is_deleted_refuses_the_deletion(
    transactional_db, tenant, monkeypatch, detached
):
    """The collector reads the workspace's events and usage before deleting; the writer's
    usage commits after that read. Without ``ledger.guard_workspace_deletion`` (the rules lock
    and a second look), the detached events' usage stayed behind, its events deleted."""
    monkeypatch.setattr("kana.jobs.enqueue_on_commit", lambda *args, **kwargs: None)
    exports = feature(tenant, "exports")
    _, event_ids = _stored_events(tenant, detached=detached)

    written, deleted = _race(
        {"workspace": tenant.workspace.pk, "feature": exports.pk, "events": event_ids},
        "delete-workspace",
        {"workspace": tenant.workspace.pk},
    )

    assert written == "committed"
    assert deleted.startswith("refused"), deleted
    assert Workspace.objects.filter(pk=tenant.workspace.pk).exists()
    assert Usage.objects.filter(workspace=tenant.workspace).count() == EVENTS
    assert set(Event.objects.filter(workspace=tenant.workspace).values_list("status", flat=True)) == {
        EventStatus.MAPPED
    }
    assert orphan_usage() == 0


@requires_postgres
@pytest.mark.postgres
def test_usage_written_while_its_user_is_deleted_with_its_events_goes_with_them(transactional_db, tenant, monkeypatch):
    """``forget_user`` deletes the user's usage, then its events; the writer's usage commits in
    between. The user's row lock and the usage's ``user_id`` check make the two wait for each
    other: PostgreSQL cancels one, and either the writer's usage never commits or the
    deletion, retried, deletes it with the events."""
    monkeypatch.setattr("kana.jobs.enqueue_on_commit", lambda *args, **kwargs: None)
    exports = feature(tenant, "exports")
    user, event_ids = _stored_events(tenant, detached=False)

    written, deleted = _race(
        {"workspace": tenant.workspace.pk, "feature": exports.pk, "events": event_ids},
        "delete-user",
        {"workspace": tenant.workspace.pk, "user": user.pk},
    )

    assert deleted == "deleted"
    assert written in ("committed", "refused OperationalError"), written
    assert not EndUser.objects.filter(pk=user.pk).exists()
    assert not Event.objects.filter(workspace=tenant.workspace).exists()
    assert not Usage.objects.filter(workspace=tenant.workspace).exists()
    assert orphan_usage() == 0
