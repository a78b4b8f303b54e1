"""A validated message, as the recording services take it.

The Segment edge (``segment_ingest.messages``) parses and validates what arrives and builds
these; ``features.ingest`` records them. Kept here, below the edge, so the services need
nothing from it.
"""

import json
from dataclasses import dataclass, field
from datetime import datetime

# One encoder for the process: ``json.dumps`` with options builds a new one on every call,
# and this runs once per message.
_compact_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def compact_json(payload: dict | list) -> str:
    return _compact_encode(payload)


@dataclass
class Message:
    type: str
    message_id: str
    payload: dict
    occurred_at: datetime
    received_at: datetime
    user_id: str | None = None
    name: str = ""  # track event name or "Viewed X Page"
    properties: dict = field(default_factory=dict)
    traits: dict = field(default_factory=dict)
    previous_id: str | None = None
    # Segment's anonymousId: what a held anonymous event (no userId) is kept under, and what
    # an identify carrying both ids links to its userId.
    anonymous_id: str | None = None
    group_id: str | None = None
    warnings: list[dict] = field(default_factory=list)
    # ``payload`` as compact JSON when parsing produced it ("" if not): stored as is.
    payload_json: str = ""

    def payload_text(self) -> str:
        return self.payload_json or compact_json(self.payload)
