"""The profile fields Kana keeps on a user, their validation and "newest wins" updates."""

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from kana.errors import DomainError

from .models import BillingProvider, EndUser


class _Unset:
    """A trait that was not sent: the field is left as it is (``None`` clears it)."""

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()

# At most 50 characters in all, like Chargebee's: the column holds 50.
_STRIPE_CUSTOMER = re.compile(r"^cus_[A-Za-z0-9]{1,46}$")
_CHARGEBEE_CUSTOMER = re.compile(r"^[A-Za-z0-9_.@-]{1,50}$")


class InvalidProfileValue(DomainError, ValueError):
    """A profile field value Kana refuses (a bad email or billing id)."""


def normalize_email(email: str) -> str:
    """What "the same email" means: case-insensitive, surrounding spaces ignored."""
    return email.strip().lower()


# A strict subset of what Django's ``validate_email`` accepts (ASCII dot-atom local part,
# dotted hostname labels, alphabetic TLD), checked first because the validator costs ~40 µs
# an address and a CSV import checks one per row. Anything it does not match goes to
# ``validate_email``, so the accepted set is exactly Django's (tests/test_csv_email_fast_path.py).
_PLAIN_EMAIL = re.compile(
    r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,63}"
)
_MAX_EMAIL_LENGTH = 320  # validate_email's limit (RFC 3696)


def is_plain_email(email: str) -> bool:
    """The fast path: True only for addresses ``validate_email`` accepts."""
    return len(email) <= _MAX_EMAIL_LENGTH and _PLAIN_EMAIL.fullmatch(email) is not None


def is_valid_email(email: str) -> bool:
    """Django's ``validate_email`` as a predicate, with a fast path for plain addresses."""
    if is_plain_email(email):
        return True
    try:
        validate_email(email)
    except ValidationError:
        return False
    return True


def clean_email(raw: str) -> str:
    email = raw.strip()
    if not is_valid_email(email):
        raise InvalidProfileValue("invalid_email", f"{raw!r} is not a valid email address", "email")
    return email


def billing_provider_for(billing_id: str) -> str:
    """The provider a billing id belongs to; raises InvalidProfileValue when it is neither's."""
    if _STRIPE_CUSTOMER.match(billing_id):
        return BillingProvider.STRIPE
    if _CHARGEBEE_CUSTOMER.match(billing_id):
        return BillingProvider.CHARGEBEE
    raise InvalidProfileValue(
        "invalid_billing_id",
        f"{billing_id!r} is not a Stripe (cus_…) or Chargebee customer id "
        "(letters, digits, _ - . @, at most 50 characters)",
        "billing_id",
    )


@dataclass
class ProfileChanges:
    """Values a message or CSV row sets. UNSET leaves a field alone, None clears it."""

    name: Any = UNSET
    email: Any = UNSET
    billing_id: Any = UNSET
    audiences: dict[str, Any] = field(default_factory=dict)

    @property
    def email_key(self) -> str:
        return normalize_email(self.email) if isinstance(self.email, str) else ""


def validated_changes(
    *, name: Any = UNSET, email: Any = UNSET, billing_id: Any = UNSET, audiences: dict[str, Any] | None = None
) -> tuple[ProfileChanges, list[InvalidProfileValue]]:
    """Drop invalid values (reported back) and keep the rest: an identify applies what it can."""
    problems: list[InvalidProfileValue] = []
    changes = ProfileChanges(audiences=dict(audiences or {}))
    if name is not UNSET:
        changes.name = None if name is None else str(name).strip()[:255] or None
    if email is not UNSET:
        if email is None or (isinstance(email, str) and not email.strip()):
            changes.email = None
        else:
            try:
                changes.email = clean_email(str(email))
            except InvalidProfileValue as problem:
                problems.append(problem)
    if billing_id is not UNSET:
        if billing_id is None or (isinstance(billing_id, str) and not billing_id.strip()):
            changes.billing_id = None
        else:
            try:
                value = str(billing_id).strip()
                billing_provider_for(value)
                changes.billing_id = value
            except InvalidProfileValue as problem:
                problems.append(problem)
    return changes, problems


def apply_changes(
    user: EndUser, changes: ProfileChanges, occurred_at: datetime, *, restamp_unchanged: bool = False
) -> bool:
    """Set each sent field unless the field was last set by a newer message. True if a value changed.

    ``restamp_unchanged``: a sent value equal to the current one still moves the field's
    ``*_set_at`` to ``occurred_at``. Segment messages use it, so the newest message that
    states a value wins whatever order messages arrive in (an older, late message cannot
    undo what a newer one confirmed). CSV rows do not: their time is the import's, and
    re-importing an unchanged file must change nothing.
    """
    changed = False

    def newer(set_at: datetime | None) -> bool:
        return set_at is None or occurred_at >= set_at

    if changes.name is not UNSET and newer(user.name_set_at):
        value = changes.name or ""
        if value != user.name or restamp_unchanged:
            changed |= value != user.name
            user.name, user.name_set_at = value, occurred_at
    if changes.email is not UNSET and newer(user.email_set_at):
        value = changes.email or ""
        if value != user.email or restamp_unchanged:
            changed |= value != user.email
            user.email, user.email_key, user.email_set_at = value, normalize_email(value), occurred_at
    if changes.billing_id is not UNSET and newer(user.billing_set_at):
        value = changes.billing_id or ""
        if value != user.billing_id or restamp_unchanged:
            changed |= value != user.billing_id
            user.billing_id = value
            user.billing_provider = billing_provider_for(value) if value else ""
            user.billing_set_at = occurred_at
    if changes.audiences:
        audiences = dict(user.audiences)
        # Stamps are compared as text, which is only right when all are written in UTC.
        stamp = occurred_at.astimezone(UTC).isoformat()
        for audience, value in changes.audiences.items():
            current = audiences.get(audience)
            if current is None or current.get("set_at", "") <= stamp:
                changed |= current is None or current.get("value") != value
                audiences[audience] = {"value": value, "set_at": stamp}
        user.audiences = audiences
    return changed


SET_AT_FIELDS = ("name_set_at", "email_set_at", "billing_set_at")

_FIELD_GROUPS = (
    ("name_set_at", ("name",)),
    ("email_set_at", ("email", "email_key")),
    ("billing_set_at", ("billing_id", "billing_provider")),
)


def combine_profiles(survivor: EndUser, absorbed: EndUser) -> None:
    """Give the survivor, per field, the most recently set non-empty value of the two."""
    for stamp, fields in _FIELD_GROUPS:
        mine, theirs = getattr(survivor, fields[0]), getattr(absorbed, fields[0])
        if not theirs:
            continue
        my_time, their_time = getattr(survivor, stamp), getattr(absorbed, stamp)
        take_theirs = not mine or (their_time is not None and (my_time is None or their_time > my_time))
        if take_theirs:
            for name in fields:
                setattr(survivor, name, getattr(absorbed, name))
            setattr(survivor, stamp, their_time)
    audiences = dict(absorbed.audiences)
    for audience, entry in survivor.audiences.items():
        if audience not in audiences or audiences[audience].get("set_at", "") <= entry.get("set_at", ""):
            audiences[audience] = entry
    survivor.audiences = audiences


def oldest_first(users: Iterable[EndUser]) -> list[EndUser]:
    """Users in merge order: the first is the survivor Kana picks (created first, tie: lowest id)."""
    return sorted(users, key=lambda u: (u.created_at, u.pk))


# An admin merge may choose, per field, whose value the merged user keeps (SPEC §12).
CHOOSABLE_FIELDS = ("name", "email", "billing_id")
FIELD_CHOICES = ("newest", "survivor", "absorbed")


def absorb_profile(survivor: EndUser, absorbed: EndUser, choices: dict[str, str] | None = None) -> None:
    """What a merge does to the survivor's row: combined fields, and a userId if it had none.

    ``choices`` (field -> ``FIELD_CHOICES``, default ``newest``): ``survivor`` keeps the
    survivor's value, ``absorbed`` takes the absorbed user's, each with its ``*_set_at``;
    a side without a value falls back to ``newest`` (a blank is still filled: nothing is lost).
    """
    before = {stamp: [getattr(survivor, name) for name in (*fields, stamp)] for stamp, fields in _FIELD_GROUPS}
    combine_profiles(survivor, absorbed)
    for stamp, fields in _FIELD_GROUPS:
        choice = (choices or {}).get(fields[0], "newest")
        if choice == "survivor" and before[stamp][0]:
            for name, value in zip((*fields, stamp), before[stamp], strict=True):
                setattr(survivor, name, value)
        elif choice == "absorbed" and getattr(absorbed, fields[0]):
            for name in (*fields, stamp):
                setattr(survivor, name, getattr(absorbed, name))
    if not survivor.user_id and absorbed.user_id:
        survivor.user_id = absorbed.user_id


@dataclass
class MergePreview:
    survivor: EndUser  # as it is now
    absorbed: list[EndUser]  # in the order the merge absorbs them
    result: EndUser  # an unsaved copy of the survivor as the merge would leave it


def merge_preview(
    users: Iterable[EndUser], *, survivor_pk: int | None = None, choices: dict[str, str] | None = None
) -> MergePreview:
    """The outcome of merging ``users`` without saving anything, by the merge's own steps."""
    ordered = oldest_first(users)
    survivor = next((u for u in ordered if u.pk == survivor_pk), None) if survivor_pk is not None else None
    survivor = survivor or ordered[0]
    absorbed = [u for u in ordered if u.pk != survivor.pk]
    result = copy.copy(survivor)
    result.audiences = dict(survivor.audiences)
    for user in absorbed:
        absorb_profile(result, user, choices)
    return MergePreview(survivor=survivor, absorbed=absorbed, result=result)


def _stamp(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _unstamp(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def profile_state(user: EndUser) -> dict[str, Any]:
    """A user's profile fields with their stamps, as JSON: what an unmerge restores."""
    state: dict[str, Any] = {"user_id": user.user_id, "audiences": copy.deepcopy(user.audiences)}
    for stamp, fields in _FIELD_GROUPS:
        for name in fields:
            state[name] = getattr(user, name)
        state[stamp] = _stamp(getattr(user, stamp))
    return state


def restore_profile(user: EndUser, snap: dict[str, Any]) -> None:
    """Give ``user`` (unsaved) the profile an absorbed user's ledger snapshot kept.

    Snapshots from before ``state`` was recorded restore the values without their stamps.
    """
    state = snap.get("state") or {}
    for stamp, fields in _FIELD_GROUPS:
        for name in fields:
            setattr(user, name, state.get(name, snap.get(name)) or "")
        setattr(user, stamp, _unstamp(state.get(stamp)))
    user.email_key = normalize_email(user.email)
    if "audiences" in state:
        user.audiences = state["audiences"]
    else:
        user.audiences = {name: {"value": value, "set_at": ""} for name, value in (snap.get("audiences") or {}).items()}
    user.created_at = _unstamp(snap.get("created_at")) or user.created_at


def revert_taken_fields(survivor: EndUser, snap: dict[str, Any], before: dict[str, Any]) -> None:
    """Undo what a merge took from the absorbed user, where nothing changed it since.

    A field of the survivor that still holds the absorbed user's value with the absorbed
    user's stamp came from the merge: it goes back to the survivor's own (``before``, the
    survivor's ``profile_state`` at the merge). A field set since (a newer message, an admin)
    stays. Ledger rows without ``before`` change nothing.
    """
    state = snap.get("state")
    if not state or not before:
        return
    for stamp, fields in _FIELD_GROUPS:
        current = (getattr(survivor, fields[0]), _stamp(getattr(survivor, stamp)))
        if current == (state.get(fields[0]), state.get(stamp)) and current != (
            before.get(fields[0]),
            before.get(stamp),
        ):
            for name in fields:
                setattr(survivor, name, before.get(name) or "")
            setattr(survivor, stamp, _unstamp(before.get(stamp)))
    audiences = dict(survivor.audiences)
    for name, entry in (state.get("audiences") or {}).items():
        if audiences.get(name) == entry and (before.get("audiences") or {}).get(name) != entry:
            if name in (before.get("audiences") or {}):
                audiences[name] = before["audiences"][name]
            else:
                del audiences[name]
    survivor.audiences = audiences


def snapshot(user: EndUser, user_ids: list[str]) -> dict[str, Any]:
    """What the ledger keeps of an absorbed user (``state``: every field with its stamp)."""
    return {
        "id": user.pk,
        "user_id": user.user_id,
        "user_ids": user_ids,
        "name": user.name,
        "email": user.email,
        "billing_id": user.billing_id,
        "billing_provider": user.billing_provider,
        "audiences": user.audience_values(),
        "created_at": user.created_at.isoformat(),
        "state": profile_state(user),
    }
