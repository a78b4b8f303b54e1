"""Issue 15, item 8: deleting a user that is receiving events.

Real concurrency on PostgreSQL: a sender thread (its own database connection) posts tracks
for one userId without pause while the test deletes that user through the REST API, again
and again. Before the fix a track committed between the delete's detaching of the user's
events and its commit, and the delete failed at COMMIT on the events' foreign key: 500.
"""

import threading
import time

from django.db import connections

from features.models import Event, Usage
from tests.api_support import ApiClient
from tests.conftest import SegmentClient, requires_postgres, wait_until
from tests.usage_support import make_feature
from users.models import EndUser, UserIdentity
from users.selectors import user_pk_for

ROUNDS = 20


@requires_postgres
def test_a_user_receiving_events_can_be_deleted(transactional_db, tenant):
    make_feature(tenant.workspace, "clicks")
    segment, api = SegmentClient(tenant), ApiClient(tenant)
    assert segment.track("busy", "Click", {"featureId": "clicks"}).status_code == 200
    stop = threading.Event()
    sent: list[int] = []

    def send_tracks():
        client = SegmentClient(tenant)
        try:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"featureId": "clicks"} if n % 2 else {}
                sent.append(client.track("busy", "Click", body, messageId=f"m-{n}").status_code)
                # Also through the COPY path (a batch of 8 or more).
                if n % 10 == 0:
                    batch = [
                        {"type": "track", "userId": "busy", "event": "Click", "messageId": f"b-{n}-{i}"}
                        for i in range(8)
                    ]
                    sent.append(client.batch(batch).status_code)
        finally:
            connections.close_all()

    sender = threading.Thread(target=send_tracks)
    sender.start()
    deletes = []
    try:
        for _ in range(ROUNDS):
            wait_until(lambda: user_pk_for(tenant.workspace, "busy") is not None, timeout=10, interval=0.01)
            time.sleep(0.02)  # let some tracks for this incarnation of the user arrive
            deletes.append(api.delete(f"users/{user_pk_for(tenant.workspace, 'busy')}").status_code)
    finally:
        stop.set()
        sender.join(timeout=60)

    assert set(deletes) <= {204, 404} and deletes.count(204) >= ROUNDS // 2, deletes
    assert len(sent) >= ROUNDS and set(sent) == {200}, sorted(set(sent))
    # Nothing points at a deleted user: events are detached or belong to a live user.
    live = set(EndUser.objects.for_workspace(tenant.workspace).values_list("pk", flat=True))
    assert set(Event.objects.filter(user__isnull=False).values_list("user_id", flat=True)) <= live
    assert set(Usage.objects.values_list("user_id", flat=True)) <= live
    assert UserIdentity.objects.filter(external_id="busy").count() <= 1
