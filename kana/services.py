"""Workspace and API key services."""

import hashlib
import secrets
import string
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import audit
from .errors import DomainError
from .models import ANONYMOUS_HOLD_DAYS_MAX, ANONYMOUS_HOLD_DAYS_MIN, AnonymousEvents, ApiKey, Workspace

API_KEY_PREFIX = "prv_live_"
_KEY_ALPHABET = string.ascii_letters + string.digits
_KEY_BODY_LENGTH = 32


def key_prefix(raw_key: str) -> str:
    """The first characters of a key, enough to recognise it in a list without revealing it."""
    return raw_key[: len(API_KEY_PREFIX) + 4]


def hash_api_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    raw_key: str  # shown once, never stored


def workspace_create(*, name: str) -> Workspace:
    return Workspace.objects.create(name=name)


def api_key_issue(*, workspace: Workspace, name: str = "", actor: str = "") -> IssuedKey:
    """Create a new key; the raw key is returned once and only its hash is kept."""
    raw_key = API_KEY_PREFIX + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(_KEY_BODY_LENGTH))
    with transaction.atomic():
        api_key = ApiKey.objects.create(
            workspace=workspace, name=name, prefix=key_prefix(raw_key), key_hash=hash_api_key(raw_key)
        )
        audit.record(workspace, actor, "key.create", api_key.pk, after={"name": name, "prefix": api_key.prefix})
    return IssuedKey(api_key=api_key, raw_key=raw_key)


def api_key_revoke(*, api_key: ApiKey, actor: str = "") -> None:
    """Revoke a key; revoking a revoked key changes nothing (and records nothing)."""
    with transaction.atomic():
        revoked = ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        if revoked:
            before = {"name": api_key.name, "prefix": api_key.prefix, "revoked": False}
            audit.record(api_key.workspace_id, actor, "key.revoke", api_key.pk, before=before, after={"revoked": True})
    _key_cache.clear()


class WorkspaceError(DomainError):
    """A workspace setting Kana refuses."""


# The settings an admin may change, and what the audit log shows of them.
WORKSPACE_SETTINGS = ("name", "anonymous_events", "anonymous_hold_days")


def workspace_settings(workspace: Workspace) -> dict:
    return {name: getattr(workspace, name) for name in WORKSPACE_SETTINGS}


def _validated_settings(changes: dict) -> dict:
    unknown = set(changes) - set(WORKSPACE_SETTINGS)
    if unknown:
        field = sorted(unknown)[0]
        raise WorkspaceError("invalid_field", f"{field} is not a workspace setting", field)
    if "name" in changes and not (isinstance(changes["name"], str) and changes["name"].strip()):
        raise WorkspaceError("invalid_value", "name must be a non-empty text", "name")
    if "anonymous_events" in changes and changes["anonymous_events"] not in AnonymousEvents.values:
        raise WorkspaceError("invalid_value", "anonymous_events must be reject or hold", "anonymous_events")
    days = changes.get("anonymous_hold_days", ANONYMOUS_HOLD_DAYS_MIN)
    if (
        isinstance(days, bool)
        or not isinstance(days, int)
        or not ANONYMOUS_HOLD_DAYS_MIN <= days <= ANONYMOUS_HOLD_DAYS_MAX
    ):
        raise WorkspaceError(
            "invalid_value",
            f"anonymous_hold_days must be a whole number from {ANONYMOUS_HOLD_DAYS_MIN} to {ANONYMOUS_HOLD_DAYS_MAX}",
            "anonymous_hold_days",
        )
    return {**changes, **({"name": changes["name"].strip()} if "name" in changes else {})}


def workspace_settings_update(*, workspace: Workspace, changes: dict, actor: str = "") -> Workspace:
    """Change a workspace's settings (``WORKSPACE_SETTINGS``); audited when something changed.

    Ingest reads the settings from the workspace its key cache holds: this process sees the
    change at once, other processes within KANA_API_KEY_CACHE_SECONDS.
    """
    changes = _validated_settings(changes)
    with transaction.atomic():
        current = Workspace.objects.select_for_update().get(pk=workspace.pk)
        before = workspace_settings(current)
        after = {**before, **changes}
        if after != before:
            Workspace.objects.filter(pk=current.pk).update(**changes)
            changed = sorted(name for name in after if after[name] != before[name])
            audit.record(
                current,
                actor,
                "workspace.update",
                current.pk,
                before={name: before[name] for name in changed},
                after={name: after[name] for name in changed},
            )
        for name, value in after.items():
            setattr(current, name, value)
    _key_cache.clear()
    return current


# Per-process cache of key hash -> (workspace, when the entry expires on the monotonic clock).
# Only positive answers are cached, for KANA_API_KEY_CACHE_SECONDS, so a revoked key stops
# working within that time on every process (at once on the process that revoked it: the
# cache is cleared). A plain dict, read and written one operation at a time, which is atomic
# for gthread workers' threads: no lock (cachetools' TTLCache needed one, and its expiry
# bookkeeping and the lock were most of a cached lookup's cost on every track).
_KEY_CACHE_MAX = 10_000
_key_cache: dict[str, tuple[Workspace, float]] = {}


def workspace_for_api_key(raw_key: str) -> Workspace | None:
    """The workspace of a live key, or None for an unknown or revoked one."""
    # Keys are ASCII: anything else (a lone surrogate from a JSON writeKey, which UTF-8 cannot
    # even encode for the hash) names no key.
    if not raw_key or len(raw_key) > 200 or not raw_key.isascii():
        return None
    key_hash = hash_api_key(raw_key)
    cached = _key_cache.get(key_hash)
    if cached is not None and time.monotonic() < cached[1]:
        return cached[0]
    api_key = ApiKey.objects.select_related("workspace").filter(key_hash=key_hash, revoked_at__isnull=True).first()
    if api_key is None:
        return None
    now = time.monotonic()
    if len(_key_cache) >= _KEY_CACHE_MAX:
        _forget_expired(now)
    _key_cache[key_hash] = (api_key.workspace, now + settings.KANA_API_KEY_CACHE_SECONDS)
    return api_key.workspace


def _forget_expired(now: float) -> None:
    """Room in a full key cache: the expired entries dropped, or all of them if none is
    (a miss then reads one key again; TTLCache dropped its oldest)."""
    for key_hash, (_, expires) in list(_key_cache.items()):
        if expires <= now:
            _key_cache.pop(key_hash, None)
    if len(_key_cache) >= _KEY_CACHE_MAX:
        _key_cache.clear()


@transaction.atomic
def workspace_create_with_key(*, name: str, key_name: str = "default", actor: str = "cli") -> IssuedKey:
    workspace = workspace_create(name=name)
    return api_key_issue(workspace=workspace, name=key_name, actor=actor)
