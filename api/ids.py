"""Kana ids as the API accepts them, in paths and in bodies."""

# Ids in URLs are digits only, so ``users/export`` or ``users/merge`` is never taken for a
# user, and fit a bigint: a longer number names nothing and must not reach the database.
ID_PATTERN = "[0-9]{1,19}"
MAX_ID = 2**63 - 1
