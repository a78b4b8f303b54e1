"""When an event happened (SPEC §3 time rules) and how batch-level fields fill messages."""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from features.models import Event

from .identity_support import ok


def occurred(segment, **fields) -> Event:
    before = timezone.now()
    body = ok(segment.track("1", "Report", **fields))
    event = Event.objects.get(message_id=body["message_id"])
    assert before <= event.received_at <= timezone.now()
    return event


@pytest.mark.parametrize(
    "times, expected",
    [
        pytest.param(
            {
                "timestamp": "2024-05-01T10:00:00Z",
                "originalTimestamp": "2024-04-01T10:00:00Z",
                "sentAt": "2024-04-01T10:00:05Z",
                "receivedAt": "2024-04-01T10:00:06Z",
            },
            datetime(2024, 5, 1, 10, tzinfo=UTC),
            id="timestamp_wins_over_every_other_time",
        ),
        # The device clock runs 1h fast: it stamped the event 30 s before sending.
        pytest.param(
            {
                "originalTimestamp": "2024-05-01T11:00:00Z",
                "sentAt": "2024-05-01T11:00:30Z",
                "receivedAt": "2024-05-01T10:00:31Z",
            },
            datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC),
            id="device_time_is_corrected_by_its_clock_skew",
        ),
        pytest.param(
            {"originalTimestamp": "2024-05-01T09:15:00.250Z"},
            datetime(2024, 5, 1, 9, 15, 0, 250000, tzinfo=UTC),
            id="original_timestamp_alone_is_taken_as_is",
        ),
        pytest.param(
            {"originalTimestamp": "9999-01-01T00:00:00Z", "sentAt": "0001-01-01T00:00:00Z"},
            datetime(9999, 1, 1, tzinfo=UTC),
            id="absurd_clocks_fall_back_to_the_original_timestamp",
        ),
    ],
)
def test_occurred_at_follows_the_time_rules(segment, times, expected):
    event = occurred(segment, **times)

    assert event.occurred_at == expected


def test_clock_skew_is_measured_against_kanas_receipt_without_received_at(segment):
    sent = timezone.now() + timedelta(hours=2)  # the device clock is 2 h fast
    event = occurred(
        segment,
        originalTimestamp=(sent - timedelta(seconds=30)).isoformat(),
        sentAt=sent.isoformat(),
    )

    assert abs(event.occurred_at - (event.received_at - timedelta(seconds=30))) < timedelta(seconds=1)


def test_without_any_time_the_event_happened_when_received(segment):
    event = occurred(segment)

    assert event.occurred_at == event.received_at


@pytest.mark.parametrize(
    "sent, expected",
    [
        ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T12:00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),  # no offset: UTC
        ("2024-05-01 12:00:00.5-0130", datetime(2024, 5, 1, 13, 30, 0, 500000, tzinfo=UTC)),
    ],
)
def test_timestamps_in_any_offset_are_kept_in_utc(segment, sent, expected):
    event = occurred(segment, timestamp=sent)

    assert event.occurred_at == expected
    assert event.occurred_at.utcoffset() == timedelta(0)


def test_batch_level_context_and_sent_at_fill_each_message(segment):
    batch = [
        {"type": "track", "userId": "1", "event": "A", "originalTimestamp": "2024-05-01T10:00:00Z"},
        {
            "type": "track",
            "userId": "1",
            "event": "B",
            "originalTimestamp": "2024-05-01T10:00:00Z",
            "sentAt": "2024-05-01T10:00:20Z",
            "context": {"locale": "fr-FR", "library": {"name": "own"}},
        },
    ]

    ok(
        segment.batch(
            batch,
            context={"library": {"name": "analytics-python"}, "ip": "203.0.113.9"},
            sentAt="2024-05-01T10:00:10Z",
            receivedAt="2024-05-01T10:00:11Z",
        )
    )

    a, b = Event.objects.get(name="A"), Event.objects.get(name="B")
    assert a.payload["context"] == {"library": {"name": "analytics-python"}, "ip": "203.0.113.9"}
    assert b.payload["context"] == {"library": {"name": "own"}, "ip": "203.0.113.9", "locale": "fr-FR"}
    assert a.occurred_at == datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC)  # batch sentAt: 10 s of skew
    assert b.occurred_at == datetime(2024, 5, 1, 9, 59, 51, tzinfo=UTC)  # its own sentAt: 20 s


def test_identify_order_follows_occurred_time_not_arrival(segment, tenant):
    from .identity_support import user_for

    ok(segment.identify("1", {"name": "Later"}, originalTimestamp="2024-05-01T10:05:00Z"))
    ok(segment.identify("1", {"name": "Earlier"}, originalTimestamp="2024-05-01T10:00:00Z"))

    assert user_for(tenant, "1").name == "Later"
