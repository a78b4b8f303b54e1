"""Conflicting values in a merge: the fields where merged users hold different values.

SPEC §12: conflicts are shown, never silent. A merge keeps, per field, the most recently set
non-empty value (``users.profile.combine_profiles``); when two users hold different values
(two billing ids, say), the older one is dropped, and the admin must see that before
confirming. Pure: reads the users' fields and ``*_set_at`` stamps, and takes what the merge
keeps from ``users.profile.merge_preview``'s result, so the answer cannot drift from the merge.
"""

from dataclasses import dataclass
from datetime import datetime

from .profile import normalize_email

# Field -> the stamp of when it was last set (as in users.profile).
CONFLICT_FIELDS = {"name": "name_set_at", "email": "email_set_at", "billing_id": "billing_set_at"}


@dataclass(frozen=True)
class Conflict:
    field: str
    survivor: str  # the survivor's value ("" when it has none)
    absorbed: str  # the absorbed user's value, never ""
    kept: str  # what the merged user keeps
    absorbed_id: int
    survivor_set_at: datetime | None
    absorbed_set_at: datetime | None

    def as_dict(self) -> dict:
        """SPEC §12's shape: ``{"field", "survivor", "absorbed", "kept"}``."""
        return {"field": self.field, "survivor": self.survivor, "absorbed": self.absorbed, "kept": self.kept}


def _same(field: str, a: str, b: str) -> bool:
    # "Jo@Example.com" and "jo@example.com" are one email to Kana (how duplicates are found).
    return normalize_email(a) == normalize_email(b) if field == "email" else a == b


def merge_conflicts(survivor, absorbed: list, result) -> list[Conflict]:
    """One ``Conflict`` per field and absorbed user whose non-empty value differs from another
    user's value of that field; ``result`` is the merged user (``merge_preview(...).result``).

    A blank filled from another user is not a conflict: nothing is lost.
    """
    conflicts = []
    for field, stamp in CONFLICT_FIELDS.items():
        values = [v for v in (getattr(u, field) or "" for u in [survivor, *absorbed]) if v]
        if all(_same(field, values[0], v) for v in values[1:]):
            continue
        mine = getattr(survivor, field) or ""
        for user in absorbed:
            theirs = getattr(user, field) or ""
            if theirs and not (mine and _same(field, mine, theirs)):
                conflicts.append(
                    Conflict(
                        field=field,
                        survivor=mine,
                        absorbed=theirs,
                        kept=getattr(result, field) or "",
                        absorbed_id=user.pk,
                        survivor_set_at=getattr(survivor, stamp),
                        absorbed_set_at=getattr(user, stamp),
                    )
                )
    return conflicts
