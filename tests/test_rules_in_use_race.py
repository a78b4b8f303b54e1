"""Deleting a rule or a feature decides "in use" under the rules lock (issue 11, defect 4).

Before, rule_delete and feature_delete checked for usage first and took the lock after: a
reprocessing chunk (which maps under the shared rules lock) could commit usage between the
check and the delete, and a rule that had mapped events was deleted anyway.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from django.db import connections, transaction

from features import ledger
from features.models import Event, EventStatus, MappingRule, Usage
from features.services import FeatureError, rule_delete
from kana.locks import lock_rules_shared

from .api_support import feature, rule
from .conftest import SegmentClient, requires_postgres

pytestmark = [requires_postgres, pytest.mark.postgres]


def test_a_rule_that_maps_events_while_it_is_being_deleted_is_not_deleted(transactional_db, tenant):
    SegmentClient(tenant).track("u1", "Exported", messageId="m-1")
    exports = feature(tenant, "exports")
    used = rule(tenant, "exports", "Exported")
    event = Event.objects.get(message_id="m-1")
    assert event.status == EventStatus.UNMAPPED  # the job that would map it has not run here
    mapping, release = threading.Event(), threading.Event()

    def map_with_the_rule():  # what a reprocessing chunk does, holding its transaction open
        try:
            with transaction.atomic():
                lock_rules_shared(tenant.workspace.pk)
                ledger.map_events(tenant.workspace.pk, [event.pk], [(event.pk, exports.pk, used.pk, Decimal(1))])
                mapping.set()
                assert release.wait(timeout=30)
        finally:
            connections.close_all()

    def delete_the_rule():
        try:
            rule_delete(workspace=tenant.workspace, rule=used)
            return None
        except FeatureError as error:
            return error.code
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        chunk = pool.submit(map_with_the_rule)
        assert mapping.wait(timeout=30)
        deleting = pool.submit(delete_the_rule)
        time.sleep(1)  # the delete now waits for the chunk's shared lock
        assert not deleting.done()
        release.set()
        chunk.result(timeout=30)
        outcome = deleting.result(timeout=30)

    assert outcome == "rule_in_use"
    assert MappingRule.objects.filter(pk=used.pk).exists()
    assert Usage.objects.get(event=event).rule_id == used.pk
