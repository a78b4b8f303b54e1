"""Issue 15, item 8: deleting a user that is receiving events.

Real concurrency on PostgreSQL: a sender thread (its own database connection) posts tracks
for one userId without pause while the test deletes that user through the REST API, one
userId after another. Before the fix a track committed between the delete's detaching of the
user's events and its commit, and the delete failed at COMMIT on the events' foreign key: 500.
Since SPEC §12 the deleted userId is suppressed in the delete's transaction: a track that
raced the delete is either detached with the user's events (anonymised) or, retried after
the delete, answered ``suppressed``. Nothing is stored under a suppressed userId afterwards.
"""

import threading
import time

import pytest
from django.db import connections

from features.models import Event, Usage
from tests.api_support import ApiClient
from tests.conftest import SegmentClient, requires_postgres, wait_until
from tests.usage_support import make_feature
from users.models import EndUser, Suppression, UserIdentity
from users.selectors import user_pk_for

# Every test here sends Segment messages: run each on both ingest routes (conftest).
pytestmark = pytest.mark.usefixtures("ingest_route")

ROUNDS = 20


@requires_postgres
def test_a_user_receiving_events_can_be_deleted(transactional_db, tenant):
    make_feature(tenant.workspace, "clicks")
    segment, api = SegmentClient(tenant), ApiClient(tenant)
    stop = threading.Event()
    target = ["busy-0"]  # the userId the sender posts for now
    sent: list[tuple[int, str]] = []

    def send_tracks():
        client = SegmentClient(tenant)
        try:
            n = 0
            while not stop.is_set():
                n += 1
                user_id = target[0]
                body = {"featureId": "clicks"} if n % 2 else {}
                response = client.track(user_id, "Click", body, messageId=f"m-{n}")
                sent.append((response.status_code, response.json().get("status")))
                # Also through the COPY path (a batch of 8 or more).
                if n % 10 == 0:
                    batch = [
                        {"type": "track", "userId": user_id, "event": "Click", "messageId": f"b-{n}-{i}"}
                        for i in range(8)
                    ]
                    sent.append((client.batch(batch).status_code, "batch"))
        finally:
            connections.close_all()

    assert segment.track("busy-0", "Click", {"featureId": "clicks"}).status_code == 200
    sender = threading.Thread(target=send_tracks)
    sender.start()
    deletes = []
    try:
        for round_ in range(ROUNDS):
            user_id = f"busy-{round_}"
            wait_until(
                lambda user_id=user_id: user_pk_for(tenant.workspace, user_id) is not None, timeout=10, interval=0.01
            )
            time.sleep(0.02)  # let some tracks for this user arrive
            deletes.append(api.delete(f"users/{user_pk_for(tenant.workspace, user_id)}").status_code)
            time.sleep(0.02)  # some tracks for the deleted userId: suppressed
            target[0] = f"busy-{round_ + 1}"
    finally:
        stop.set()
        sender.join(timeout=60)

    assert set(deletes) == {204}, deletes
    assert len(sent) >= ROUNDS and {code for code, _ in sent} == {200}, sent
    assert ("200", "suppressed") in {(str(code), status) for code, status in sent}
    suppressed = set(Suppression.objects.for_workspace(tenant.workspace).values_list("user_id", flat=True))
    assert suppressed == {f"busy-{n}" for n in range(ROUNDS)}
    # Nothing points at a deleted user, and nothing is stored under a suppressed userId: the
    # deleted users' events are detached and anonymised, later ones were not stored.
    live = set(EndUser.objects.for_workspace(tenant.workspace).values_list("pk", flat=True))
    assert set(Event.objects.filter(user__isnull=False).values_list("user_id", flat=True)) <= live
    assert set(Usage.objects.filter(user__isnull=False).values_list("user_id", flat=True)) <= live
    assert not Event.objects.filter(external_user_id__in=suppressed).exists()
    assert not UserIdentity.objects.filter(external_id__in=suppressed).exists()
