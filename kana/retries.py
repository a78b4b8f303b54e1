"""Re-running a transaction that lost a race the database detected.

Most races are settled by the statements themselves (``INSERT … ON CONFLICT DO NOTHING``
decides replays; advisory locks order writers). What remains (a deadlock, a serialization
failure, a row that changed between a read and the lock) is retried here a bounded number of
times; after that the caller gets ``RetriesExhausted``, which every edge answers with 503 and
``Retry-After`` (never a 500), so Segment and API clients try again later.

Only the outermost loop retries: a retried operation that calls another retried operation
(ingest → identify) runs the inner one once, and a failure re-runs the whole transaction.
Retrying inside a savepoint would keep the outer transaction's locks and stale reads.
"""

import contextvars
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import IntegrityError, OperationalError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs worth a retry: serialization failure, deadlock detected.
RETRYABLE_SQLSTATES = {"40001", "40P01"}
MAX_ATTEMPTS = 6

_inside_retry_loop = contextvars.ContextVar("kana_inside_retry_loop", default=False)


class ConcurrentChange(Exception):
    """What a transaction read changed under it (e.g. a user deleted meanwhile): run it again."""


class RetriesExhausted(Exception):
    """The database kept reporting conflicts: the edges answer 503 with ``Retry-After``."""


def is_retryable(exc: Exception) -> bool:
    if isinstance(exc, (IntegrityError, ConcurrentChange)):
        return True
    cause = getattr(exc, "__cause__", None)
    return isinstance(exc, OperationalError) and getattr(cause, "sqlstate", None) in RETRYABLE_SQLSTATES


def run_with_retries(operation: Callable[[], T]) -> T:
    """Run a transactional operation, re-running it on races the database detected."""
    if _inside_retry_loop.get():
        return operation()
    token = _inside_retry_loop.set(True)
    try:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return operation()
            except (IntegrityError, OperationalError, ConcurrentChange) as exc:
                if not is_retryable(exc):
                    raise
                if attempt == MAX_ATTEMPTS:
                    logger.warning("transaction retries exhausted", extra={"error": type(exc).__name__})
                    raise RetriesExhausted(str(exc)) from exc
                logger.info("transaction retried", extra={"attempt": attempt, "error": type(exc).__name__})
                time.sleep(random.uniform(0, 0.01 * attempt))
        raise AssertionError("unreachable")
    finally:
        _inside_retry_loop.reset(token)
