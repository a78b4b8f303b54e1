"""Workspace and API key services."""

import hashlib
import secrets
import string
import threading
from dataclasses import dataclass

from cachetools import TTLCache
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import audit
from .models import ApiKey, Workspace

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
    with _key_cache_lock:
        _key_cache.clear()


# Per-process cache of key hash -> workspace. Only positive answers are cached, for
# KANA_API_KEY_CACHE_SECONDS, so a revoked key stops working within that time on every
# process (at once on the process that revoked it). TTLCache is not thread-safe: gthread
# workers share it, hence the lock.
_key_cache: TTLCache = TTLCache(maxsize=10_000, ttl=settings.KANA_API_KEY_CACHE_SECONDS)
_key_cache_lock = threading.Lock()


def workspace_for_api_key(raw_key: str) -> Workspace | None:
    """The workspace of a live key, or None for an unknown or revoked one."""
    # Keys are ASCII: anything else (a lone surrogate from a JSON writeKey, which UTF-8 cannot
    # even encode for the hash) names no key.
    if not raw_key or len(raw_key) > 200 or not raw_key.isascii():
        return None
    key_hash = hash_api_key(raw_key)
    with _key_cache_lock:
        cached = _key_cache.get(key_hash)
    if cached is not None:
        return cached
    api_key = ApiKey.objects.select_related("workspace").filter(key_hash=key_hash, revoked_at__isnull=True).first()
    if api_key is None:
        return None
    with _key_cache_lock:
        _key_cache[key_hash] = api_key.workspace
    return api_key.workspace


@transaction.atomic
def workspace_create_with_key(*, name: str, key_name: str = "default", actor: str = "cli") -> IssuedKey:
    workspace = workspace_create(name=name)
    return api_key_issue(workspace=workspace, name=key_name, actor=actor)
