"""userIds, previousIds and groupIds: what counts as one, and what means "nobody".

Shared by every way users arrive (Segment messages, CSV rows), so an id means the same
wherever it comes from.
"""

import math
from typing import Any

from kana.errors import DomainError

MAX_ID_LENGTH = 255

# Identifiers that mean "nobody": treated as absent (analytics libraries send them for
# logged-out visitors, and template bugs produce the rest).
NOBODY_IDS = frozenset(
    {
        "",
        "null",
        "undefined",
        "none",
        "nan",
        "0",
        "-1",
        "anonymous",
        "guest",
        "[object object]",
        "distinct_id",
        "true",
        "false",
        "nil",
    }
)


class InvalidIdentifier(DomainError):
    """An id of the wrong type or length."""


def clean_identifier(value: Any, field_name: str) -> str | None:
    """A userId/previousId/groupId as text, None for absent or "nobody" values."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value) if value.is_integer() else value
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidIdentifier("invalid_type", f"{field_name} must be a string", field_name)
    value = value.strip()
    if value.lower() in NOBODY_IDS:
        return None
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdentifier("invalid_value", f"{field_name} is longer than {MAX_ID_LENGTH} characters", field_name)
    return value
