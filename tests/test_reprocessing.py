"""Retroactive reprocessing: exact counts, bounded queries, and exactness under concurrency.

In-process tests run the job at commit (``tasks_in_process``); the ``celery_worker`` tests
run it in a real worker process on PostgreSQL + Redis.
"""

import threading

from django.db import connection, connections, transaction

from features.models import Usage
from segment_ingest.models import Event, EventStatus
from tests.conftest import SegmentClient, requires_postgres, wait_until
from tests.usage_support import make_feature, make_rule, usage_count


def _waiting_advisory_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        return cursor.fetchone()[0]


@requires_postgres
def test_an_event_waiting_on_rule_creation_is_mapped_with_the_new_rule(transactional_db, tenant, tasks_in_process):
    make_feature(tenant.workspace, "reports")
    segment = SegmentClient(tenant)
    # Warm this process's rule cache at the version before the rule.
    assert segment.track("u1", "Report Exported").json()["status"] == "unmapped"
    results = {}

    def send_during_creation():
        try:
            results["response"] = SegmentClient(tenant).track("u1", "Report Exported", messageId="during")
        finally:
            connections.close_all()

    with transaction.atomic():
        make_rule(tenant.workspace, "reports", event="Report Exported")
        sender = threading.Thread(target=send_during_creation)
        sender.start()
        # The ingest transaction is now queued behind the rule's exclusive lock.
        wait_until(lambda: _waiting_advisory_locks() == 1, timeout=10, message="ingest waiting on the rules lock")
    sender.join(timeout=30)

    assert results["response"].json()["status"] == "mapped"
    during = Event.objects.get(workspace=tenant.workspace, message_id="during")
    assert during.status == EventStatus.MAPPED
    assert Usage.objects.filter(event=during).count() == 1
    # The warm-up event was stored before the rule: reprocessing mapped it.
    assert usage_count(tenant.workspace, "reports") == 2
