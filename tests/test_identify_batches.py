"""Runs of identify messages in a batch go through the identity engine in one pass per chunk
(issue 15: a batch of 2,500 identifies took ~30 s and answered 500). The outcome must be the
same as sending the messages one at a time."""

import random

import pytest

from features.ingest import PROFILE_CHUNK
from features.models import Event
from users.models import EndUser, Group, GroupMembership, MergeRecord, UserIdentity

from .conftest import SegmentClient
from .identity_support import bare_user, identities_of, user_for

# Every test here sends Segment messages: run each on both ingest routes (conftest).
pytestmark = pytest.mark.usefixtures("ingest_route")


def _state(tenant):
    users = sorted(
        (u.user_id, u.name, u.email, u.billing_id, sorted(identities_of(u)))
        for u in EndUser.objects.for_workspace(tenant.workspace)
    )
    merges = MergeRecord.objects.for_workspace(tenant.workspace).count()
    return users, merges, Event.objects.for_workspace(tenant.workspace).count()


def _messages(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    messages = []
    for n in range(count):
        traits = {"name": f"name-{rng.randrange(5)}"}
        if rng.random() < 0.6:
            traits["email"] = f"person{rng.randrange(8)}@example.com"
        if rng.random() < 0.2:
            traits["billingId"] = f"cus_{rng.randrange(100):04d}"
        messages.append(
            {
                "type": "identify",
                "userId": f"u{rng.randrange(12)}",
                "traits": traits,
                "messageId": f"m-{seed}-{n}",
                "timestamp": f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}Z",
            }
        )
    return messages


@pytest.mark.parametrize("seed", range(4))
def test_a_batch_of_identifies_ends_as_the_same_messages_sent_one_at_a_time(tenant, other_tenant, seed):
    for t in (tenant, other_tenant):
        for i in range(3):  # bare users (Stripe imports) that identifies claim or merge
            bare_user(t, f"person{i}@example.com", name=f"Bare {i}")
    messages = _messages(seed, 150)

    batch = SegmentClient(tenant).batch(messages)
    singles = [SegmentClient(other_tenant).post("/v1/identify", m) for m in messages]

    assert batch.status_code == 200 and batch.json()["accepted"] == len(messages)
    assert {s.status_code for s in singles} == {200}
    assert _state(tenant) == _state(other_tenant)


def test_a_merge_of_a_user_created_earlier_in_the_same_batch_is_applied_in_order(tenant, segment):
    bare = bare_user(tenant, "zed@example.com", name="Zed from Stripe")
    response = segment.batch(
        [
            {"type": "identify", "userId": "zed", "traits": {"name": "Zed"}, "messageId": "i-1"},
            {"type": "identify", "userId": "zed", "traits": {"email": "zed@example.com"}, "messageId": "i-2"},
        ]
    )

    assert response.status_code == 200 and response.json()["accepted"] == 2
    survivor = user_for(tenant, "zed")
    assert survivor.pk == bare.pk  # merged into the oldest: the Stripe user
    assert identities_of(survivor) == {"zed"}
    assert MergeRecord.objects.filter(survivor_key=bare.pk).count() == 1
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 1


def test_a_batch_longer_than_a_chunk_and_its_replay(tenant, segment):
    messages = [
        {"type": "identify", "userId": f"c{n % 40}", "traits": {"name": f"v{n}"}, "messageId": f"c-{n}"}
        for n in range(PROFILE_CHUNK * 2 + 30)
    ]

    first = segment.batch(messages).json()
    replay = segment.batch(messages).json()

    assert (first["accepted"], first["duplicates"]) == (len(messages), 0)
    assert (replay["accepted"], replay["duplicates"]) == (0, len(messages))
    assert EndUser.objects.for_workspace(tenant.workspace).count() == 40
    assert UserIdentity.objects.for_workspace(tenant.workspace).count() == 40
    last = {m["userId"]: m["traits"]["name"] for m in messages}
    assert {u.user_id: u.name for u in EndUser.objects.for_workspace(tenant.workspace)} == last


def _groups(tenant):
    groups = {g.group_id: (g.traits, g.traits_set_at) for g in Group.objects.for_workspace(tenant.workspace)}
    members = sorted(
        (m.group.group_id, m.user.user_id, m.joined_at)
        for m in GroupMembership.objects.for_workspace(tenant.workspace).select_related("group", "user")
    )
    return groups, members


@pytest.mark.parametrize("seed", range(3))
def test_a_batch_of_group_calls_ends_as_the_same_calls_sent_one_at_a_time(tenant, other_tenant, seed):
    rng = random.Random(seed)
    messages = [
        {
            "type": "group",
            "userId": f"u{rng.randrange(15)}",
            "groupId": f"acct-{rng.randrange(4)}",
            "traits": rng.choice([{}, {"plan": rng.choice(["free", "pro"]), "n": n}]),
            "messageId": f"g-{seed}-{n}",
            "timestamp": f"2026-01-01T00:00:{rng.randrange(60):02d}Z",  # out of order, with ties
        }
        for n in range(120)
    ]

    batch = SegmentClient(tenant).batch(messages)
    singles = [SegmentClient(other_tenant).post("/v1/group", m) for m in messages]

    assert batch.status_code == 200 and batch.json()["accepted"] == len(messages)
    assert {s.status_code for s in singles} == {200}
    assert _groups(tenant) == _groups(other_tenant)
    assert len(_groups(tenant)[0]) == 4


def test_a_batch_of_aliases_ends_as_the_same_aliases_sent_one_at_a_time(tenant, other_tenant):
    rng = random.Random(7)
    for t in (tenant, other_tenant):
        for i in range(6):
            SegmentClient(t).identify(f"known-{i}")
    messages = []
    for n in range(150):
        previous_id, user_id = rng.sample([f"known-{i}" for i in range(6)] + [f"anon-{i}" for i in range(10)], 2)
        messages.append({"type": "alias", "previousId": previous_id, "userId": user_id, "messageId": f"a-{n}"})

    batch = SegmentClient(tenant).batch(messages)
    singles = [SegmentClient(other_tenant).post("/v1/alias", m) for m in messages]

    assert batch.status_code == 200 and batch.json()["accepted"] == len(messages)
    assert {s.status_code for s in singles} == {200}
    assert _state(tenant) == _state(other_tenant)
    replay = SegmentClient(tenant).batch(messages).json()
    assert (replay["accepted"], replay["duplicates"]) == (0, len(messages))
