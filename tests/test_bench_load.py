"""The benchmark's load client builds valid, distinct Segment messages (no server needed)."""

import json

from django.utils import timezone

from bench.load import BatchFactory, IdentifyMixFactory, TrackFactory
from segment_ingest.messages import parse_message


def test_track_messages_are_valid_and_each_has_its_own_message_id():
    factory = TrackFactory("s1", {"users": 10})
    bodies = [json.loads(factory(n)[0]) for n in range(50)]
    assert len({b["messageId"] for b in bodies}) == 50
    assert {b["userId"] for b in bodies} == {f"u{i}" for i in range(10)}
    for body in bodies:
        assert parse_message(body, received_at=timezone.now()).properties["featureId"] == "reports"


def test_a_batch_holds_distinct_messages_half_of_them_shaped_for_the_rules():
    factory = BatchFactory("s3", {"size": 100, "users": 1000})
    first, second = (json.loads(factory(n)[0])["batch"] for n in (0, 1))
    ids = {m["messageId"] for m in first + second}
    assert len(ids) == 200
    mapped = [
        m
        for m in first
        if m["event"] == "Report Exported" or m["properties"].get("plan", {}).get("tier") == "enterprise"
    ]
    assert len(mapped) == 50


def test_the_identify_mix_cycles_through_its_four_kinds_and_stops_when_a_pool_is_used_up():
    factory = IdentifyMixFactory("s2", {"update_pool": 5, "claim_pool": 2, "merge_pool": 2})
    made = [factory(n) for n in range(12)]
    kinds = [m[1] for m in made if m is not None]
    assert kinds == ["create", "update", "claim", "merge"] * 2 + ["create", "update"]
    assert made[10] is None
