"""A batch's own fields fill its messages (``segment_ingest.messages.batch_context``) exactly as
the per-message merge did before it read the batch once: same messages out, for every shape of
batch and message field. Pure: no database."""

import copy
import itertools
from typing import Any

import pytest

from segment_ingest.messages import batch_context


def reference_with_batch_context(message: Any, batch: dict) -> Any:
    """The merge as it was (main before round 9), kept here as the specification."""
    if not isinstance(message, dict):
        return message
    for key in ("context", "integrations"):
        shared = batch.get(key)
        if isinstance(shared, dict):
            own = message.get(key)
            if own is None:
                message[key] = dict(shared)
            elif isinstance(own, dict):
                message[key] = {**shared, **own}
    for key in ("sentAt", "receivedAt"):
        if key in batch and key not in message:
            message[key] = batch[key]
    return message


OBJECTS = [None, {}, {"library": {"name": "analytics-python"}, "ip": "203.0.113.9"}, [], "text", 0]
OWN_OBJECTS = ["absent", None, {}, {"ip": "198.51.100.1", "locale": "fr-FR"}, ["x"], "text"]
TIMES = ["absent", None, "", "2024-05-01T10:00:10Z", 5]


def shaped(fields: dict) -> dict:
    return {key: value for key, value in fields.items() if value != "absent"}


@pytest.mark.parametrize("batch_context_value, batch_integrations", list(itertools.product(OBJECTS, OBJECTS[:3])))
@pytest.mark.parametrize("batch_sent_at", TIMES)
def test_every_message_is_filled_as_before(batch_context_value, batch_integrations, batch_sent_at):
    batch = shaped(
        {
            "context": batch_context_value,
            "integrations": batch_integrations,
            "sentAt": batch_sent_at,
            "receivedAt": "2024-05-01T10:00:11Z",
        }
    )
    messages = [
        shaped({"type": "track", "context": own, "integrations": own_integrations, "sentAt": sent_at})
        for own, own_integrations, sent_at in itertools.product(OWN_OBJECTS, OWN_OBJECTS[:3], TIMES)
    ] + [None, [], "not a message", 7]
    expected_batch = copy.deepcopy(batch)

    fill = batch_context(batch)
    filled = [fill(message) for message in copy.deepcopy(messages)]

    assert filled == [reference_with_batch_context(message, batch) for message in copy.deepcopy(messages)]
    assert batch == expected_batch


def test_each_message_gets_its_own_copy_of_the_batch_context():
    batch = {"context": {"ip": "203.0.113.9"}, "integrations": {"All": True}}
    fill = batch_context(batch)

    first, second = fill({"type": "track"}), fill({"type": "track", "integrations": {"Mixpanel": False}})
    first["context"]["ip"] = "changed"
    first["integrations"]["All"] = False

    assert second == {
        "type": "track",
        "context": {"ip": "203.0.113.9"},
        "integrations": {"All": True, "Mixpanel": False},
    }
    assert batch == {"context": {"ip": "203.0.113.9"}, "integrations": {"All": True}}
