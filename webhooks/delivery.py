"""Sending deliveries: claim, sign, POST, record, and schedule the retry.

A pending delivery whose ``next_attempt_at`` has come is *claimed* in a short transaction:
``SELECT … FOR UPDATE SKIP LOCKED`` picks it (a row another worker is claiming is skipped,
not waited for), and the same transaction counts the attempt and moves ``next_attempt_at``
past the POST's timeout (the claim's lease). No other worker sees it as due meanwhile, so
an attempt is sent once; the POST itself runs outside any transaction. The result is
recorded only if the attempt is still the delivery's latest (a worker that hung past its
lease and was overtaken records nothing). A worker that dies mid-POST leaves the lease to
lapse, and the sweeper tries again: retries live in the database, not in the broker.

2xx is delivered. Anything else (another status, a redirect, a timeout, a refused
connection) is retried with exponential backoff and jitter until
``KANA_WEBHOOK_RETRY_WINDOW_SECONDS`` (24 hours) after the event, then ``failed``.
"""

import hashlib
import hmac
import json
import logging
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from http.client import HTTPException
from urllib.parse import urlsplit

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from . import addresses
from .models import DeliveryAttempt, DeliveryStatus, WebhookDelivery, WebhookEvent

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Kana-Signature"
USER_AGENT = "Kana-Webhooks/1.0"
# The start of a response body kept with each attempt: enough to see an error message.
RESPONSE_EXCERPT_CHARS = 500
_RESPONSE_READ_BYTES = 2048
# A claim outlives the POST's timeout by this much before another worker may take over.
LEASE_MARGIN_SECONDS = 30


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    attempt: int  # this attempt's number (1 for the first)


@dataclass(frozen=True)
class Answer:
    """What one POST got: a status code and the start of the body, or an error."""

    status_code: int | None
    excerpt: str
    error: str
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def payload(event: WebhookEvent) -> bytes:
    """The body of every delivery of ``event``: the same bytes at every attempt."""
    body = {
        "id": event.pk,
        "type": event.event_type,
        "created": event.created_at.isoformat().replace("+00:00", "Z"),
        "data": event.data,
    }
    return json.dumps(body, cls=DjangoJSONEncoder, separators=(",", ":"), sort_keys=True).encode()


def signature(secret: str | list[str], timestamp: int, body: bytes) -> str:
    """``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` (Stripe's scheme): the receiver
    recomputes it from the raw body and refuses an old ``t`` (replays). With several secrets
    (just after a rotation) there is one ``v1=`` per secret, current first; a receiver
    accepts the delivery when any of them matches the secret it holds."""
    signed = f"{timestamp}.".encode() + body
    digests = [hmac.new(key.encode(), signed, hashlib.sha256).hexdigest() for key in _as_list(secret)]
    return ",".join([f"t={timestamp}", *(f"v1={digest}" for digest in digests)])


def _as_list(secret: str | list[str]) -> list[str]:
    return [secret] if isinstance(secret, str) else secret


def backoff_seconds(attempt: int) -> float:
    """How long to wait after failed attempt number ``attempt``: doubling from the base, capped,
    with jitter (between half and all of it) so endpoints that failed together are not retried
    in lockstep."""
    delay = min(
        settings.KANA_WEBHOOK_BACKOFF_MAX_SECONDS, settings.KANA_WEBHOOK_BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)
    )
    return delay * random.uniform(0.5, 1.0)


def claim(*, delivery_id: int | None = None) -> Claimed | None:
    """Claim the due pending delivery ``delivery_id`` (or the one due longest, when None) for one
    attempt; None when there is none (not due yet, finished, or being claimed by another worker)."""
    now = timezone.now()
    lease = timedelta(seconds=settings.KANA_WEBHOOK_TIMEOUT_SECONDS + LEASE_MARGIN_SECONDS)
    with transaction.atomic():
        due = WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING, next_attempt_at__lte=now)
        if delivery_id is not None:
            due = due.filter(pk=delivery_id)
        row = (
            due.order_by("next_attempt_at", "pk")
            .select_for_update(skip_locked=True)
            .values_list("pk", "attempt_count")
            .first()
        )
        if row is None:
            return None
        pk, attempts = row
        WebhookDelivery.objects.filter(pk=pk).update(
            attempt_count=F("attempt_count") + 1, next_attempt_at=now + lease, last_attempt_at=now
        )
    return Claimed(delivery_id=pk, attempt=attempts + 1)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A 3xx is an answer like any other (not delivered): following it would send the signed
    # body to a URL the customer did not register.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _opener() -> urllib.request.OpenerDirector:
    # No proxy from the environment: deliveries go straight out, or through the one egress
    # proxy the deployment names.
    proxy = settings.KANA_WEBHOOK_PROXY
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": proxy, "https": proxy} if proxy else {}), _NoRedirects
    )


def _excerpt(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")[:RESPONSE_EXCERPT_CHARS]


def post(url: str, body: bytes, headers: dict[str, str]) -> Answer:
    """POST ``body`` to ``url``; never raises for what the network or the receiver does."""
    refused = addresses.refusal(urlsplit(url).hostname or "")
    if refused:
        return Answer(status_code=None, excerpt="", error=refused, duration_ms=0)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    started = time.monotonic()
    status_code, excerpt, error = None, "", ""
    try:
        with _opener().open(request, timeout=settings.KANA_WEBHOOK_TIMEOUT_SECONDS) as response:
            status_code = response.status
            excerpt = _excerpt(response.read(_RESPONSE_READ_BYTES))
    except urllib.error.HTTPError as answer:  # a non-2xx status: an answer, with a body
        status_code = answer.code
        try:
            excerpt = _excerpt(answer.read(_RESPONSE_READ_BYTES))
        except (OSError, HTTPException):
            pass
    except urllib.error.URLError as failure:
        error = f"{type(failure.reason).__name__}: {failure.reason}"
    except (OSError, HTTPException, ValueError) as failure:  # timeouts, resets, bad answers
        error = f"{type(failure).__name__}: {failure}" if str(failure) else type(failure).__name__
    duration_ms = int((time.monotonic() - started) * 1000)
    return Answer(status_code=status_code, excerpt=excerpt, error=error[:1000], duration_ms=duration_ms)


def attempt(claimed: Claimed) -> str:
    """Send one claimed attempt and record it; returns the delivery's status afterwards."""
    delivery = WebhookDelivery.objects.select_related("event", "endpoint").filter(pk=claimed.delivery_id).first()
    if delivery is None:  # its endpoint was deleted meanwhile, and its deliveries with it
        return DeliveryStatus.FAILED
    endpoint = delivery.endpoint
    if not endpoint.active:
        return _finish_unsent(claimed, "the endpoint was deactivated")
    body = payload(delivery.event)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        SIGNATURE_HEADER: signature(endpoint.signing_secrets(timezone.now()), int(time.time()), body),
    }
    answer = post(endpoint.url, body, headers)
    return record(claimed, answer)


def record(claimed: Claimed, answer: Answer) -> str:
    """Log the attempt and move the delivery on: delivered, a retry later, or failed once the
    next retry would fall outside the retry window. Nothing is written when the attempt is no
    longer the delivery's latest (its lease lapsed and another worker took over)."""
    now = timezone.now()
    with transaction.atomic():
        delivery = (
            WebhookDelivery.objects.select_for_update()
            .filter(pk=claimed.delivery_id, status=DeliveryStatus.PENDING, attempt_count=claimed.attempt)
            .first()
        )
        if delivery is None:
            logger.warning("webhook attempt overtaken; not recorded", extra={"delivery_id": claimed.delivery_id})
            return DeliveryStatus.PENDING
        DeliveryAttempt.objects.create(
            workspace_id=delivery.workspace_id,
            delivery=delivery,
            number=claimed.attempt,
            attempted_at=delivery.last_attempt_at or now,
            status_code=answer.status_code,
            response_excerpt=answer.excerpt,
            error=answer.error,
            duration_ms=answer.duration_ms,
        )
        delivery.last_status_code, delivery.last_response, delivery.last_error = (
            answer.status_code,
            answer.excerpt,
            answer.error,
        )
        if answer.delivered:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.DELIVERED, None
        else:
            retry_at = now + timedelta(seconds=backoff_seconds(claimed.attempt))
            deadline = delivery.created_at + timedelta(seconds=settings.KANA_WEBHOOK_RETRY_WINDOW_SECONDS)
            if retry_at > deadline:
                delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, None
            else:
                delivery.next_attempt_at = retry_at
        delivery.save(update_fields=["status", "next_attempt_at", "last_status_code", "last_response", "last_error"])
    logger.info(
        "webhook attempt",
        extra={
            "delivery_id": delivery.pk,
            "attempt": claimed.attempt,
            "status_code": answer.status_code,
            "status": delivery.status,
        },
    )
    return delivery.status


def _finish_unsent(claimed: Claimed, reason: str) -> str:
    # The claimed attempt was not made: it is not counted.
    WebhookDelivery.objects.filter(
        pk=claimed.delivery_id, status=DeliveryStatus.PENDING, attempt_count=claimed.attempt
    ).update(
        status=DeliveryStatus.FAILED, next_attempt_at=None, last_error=reason, attempt_count=F("attempt_count") - 1
    )
    return DeliveryStatus.FAILED


def send_if_due(delivery_id: int) -> str | None:
    """One attempt of ``delivery_id`` if it is due and nobody else is sending it."""
    claimed = claim(delivery_id=delivery_id)
    return attempt(claimed) if claimed else None


def send_due(*, time_budget_seconds: float) -> int:
    """Attempt due deliveries, longest due first, until none is due or the budget is spent
    (the next sweep goes on); returns how many attempts were made."""
    started, sent = time.monotonic(), 0
    while time.monotonic() - started < time_budget_seconds:
        claimed = claim()
        if claimed is None:
            break
        attempt(claimed)
        sent += 1
    return sent
