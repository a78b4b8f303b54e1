"""May this user (or group) use this feature now? Checks, consumes, API usage records and
reservations (SPEC §11).

A decision reads the subject's subscriptions (a user's own and its groups'), picks the
package feature with the highest limit (null beats any number), and counts the period that
contains now from the daily usage counters (``features.counters.period_used``) plus what
reservations hold. Consumes, records and holds take a transaction-scoped advisory lock per
(workspace, budget, feature) before deciding, so two of them on one budget decide one after
the other, each seeing what the other recorded: a hard limit is never overspent.

Usage recorded here goes through ``features.ledger`` as an event whose messageId is the
idempotency key: a key is unique per workspace forever, in one namespace with Segment's
messageIds, so a repeated key (or a Segment messageId used as one) is a replay.
"""

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

from django.db import transaction
from django.db.models import Q, Sum
from django.utils import timezone

from features import counters, ledger
from features.incoming import Message
from features.mapping import Decision
from features.models import Event, EventStatus, Feature, FeatureType, MessageType
from kana.db import kept_cursor, pipelined
from kana.locks import lock_keys, lock_keys_expressions
from kana.models import Workspace
from kana.retries import run_with_retries
from users import selectors as user_selectors
from users.models import Group, GroupMembership
from users.services import resolve_users, suppressed_user_ids

from . import reads
from .models import (
    ACCESS_STATUSES,
    PackageFeature,
    Reservation,
    ReservationStatus,
    Subscription,
)
from .periods import past_periods, period_containing
from .services import EntitlementError, subject_key

# The name of the events that API records and commits store.
RECORDED_EVENT = "Usage Recorded"

MESSAGES = {
    "binary_access": "the feature is included in a live package",
    "within_limit": "within the period's budget",
    "overage_enabled": "over the budget, and the package allows overage",
    "limit_reached": "the period's budget is used up",
    "no_subscription": "no subscription",
    "subscription_inactive": "no active or trialing subscription",
    "feature_not_in_package": "no live package includes this feature",
    "unknown_user": "no such user",
    "unknown_group": "no such group",
    "unknown_feature": "no such feature",
}


def number(value: Decimal | None):
    """A Decimal as JSON shows it: an int when whole, else a float; None stays None."""
    if value is None:
        return None
    value = Decimal(value)
    return int(value) if value == value.to_integral_value() else float(value)


@dataclass
class Consumption:
    used: Decimal
    budget: Decimal | None  # None: unlimited
    held: Decimal = Decimal(0)
    overage_enabled: bool = False

    @property
    def remaining(self) -> Decimal | None:
        return None if self.budget is None else max(self.budget - self.used - self.held, Decimal(0))

    def as_dict(self) -> dict:
        return {
            "used": number(self.used),
            "budget": number(self.budget),
            "remaining": number(self.remaining),
            "held": number(self.held),
            "overage_enabled": self.overage_enabled,
        }


@dataclass
class Entitlement:
    """One decision: access, the reason code, and (for consumables) the budget it read."""

    access: bool
    reason: str
    consumption: Consumption | None = None
    period: tuple[datetime, datetime | None] | None = None
    # The budget's owner ("user:<id>"/"group:<id>") and what its usage is summed over.
    owner: str | None = None
    owner_user_pks: list[int] = field(default_factory=list)
    feature: Feature | None = None
    reset_period: str | None = None
    anchor: datetime | None = None

    def as_dict(self) -> dict:
        return {
            "access": self.access,
            "reason": self.reason,
            "message": MESSAGES[self.reason],
            "consumption": self.consumption.as_dict() if self.consumption else None,
            "period": period_dict(self.period),
        }


def period_dict(period) -> dict | None:
    if period is None:
        return None
    start, end = period
    return {"start": start.isoformat(), "end": end.isoformat() if end else None}


@dataclass(frozen=True)
class Subject:
    """Who asks: a user (and the groups it belongs to) or a group."""

    user_pk: int | None = None
    group_pk: int | None = None
    group_pks: tuple[int, ...] = ()

    def lock_keys(self, workspace_id: int, feature_id: int) -> list[str]:
        """One key per budget this subject may draw on: its own and each of its groups'."""
        budgets = [subject_key(user_pk=self.user_pk)] if self.user_pk else []
        budgets += [subject_key(group_pk=pk) for pk in (self.group_pks or (self.group_pk,)) if pk]
        return [f"budget:{workspace_id}:{budget}:{feature_id}" for budget in budgets]


def user_subject(workspace: Workspace, user_pk: int) -> Subject:
    groups = GroupMembership.objects.for_workspace(workspace).filter(user_id=user_pk).values_list("group_id", flat=True)
    return Subject(user_pk=user_pk, group_pks=tuple(sorted(groups)))


def find_subject(workspace: Workspace, *, user_id: str | None = None, group_id: str | None = None) -> Subject | None:
    if user_id is not None:
        user_pk = user_selectors.user_pk_for(workspace, user_id)
        return None if user_pk is None else user_subject(workspace, user_pk)
    group_pk = Group.objects.for_workspace(workspace).filter(group_id=group_id).values_list("pk", flat=True).first()
    return None if group_pk is None else Subject(group_pk=group_pk)


def held_amount(workspace_id: int, owner: str, feature_id: int, now: datetime) -> Decimal:
    """What unexpired holds keep of a budget (an expired hold frees itself here, at read time)."""
    held = (
        Reservation.objects.for_workspace(workspace_id)
        .filter(subject=owner, feature_id=feature_id, status=ReservationStatus.HELD, expires_at__gt=now)
        .aggregate(total=Sum("amount"))["total"]
    )
    return Decimal(held or 0)


def _owner_members(workspace_id: int, *, user_pk: int | None, group_pk: int | None) -> list[int]:
    """The users whose usage a budget counts: its user, or every member of its group."""
    if user_pk is not None:
        return [user_pk]
    return list(
        GroupMembership.objects.for_workspace(workspace_id).filter(group_id=group_pk).values_list("user_id", flat=True)
    )


class Offer(NamedTuple):
    """A package's terms for one feature (what the decision reads of a ``PackageFeature``)."""

    limit: Decimal | None
    overage_enabled: bool
    reset_period: str


def _rank(candidate):
    # The highest limit wins (null beats any number); on a tie, overage, then the subject's own
    # subscription, then the oldest.
    offer, subscription = candidate
    return (
        offer.limit is None,
        offer.limit or 0,
        offer.overage_enabled,
        subscription["user_id"] is not None,
        -subscription["pk"],
    )


def _choose(feature: Feature, subscriptions: list[dict], offers_for) -> "Entitlement | tuple[Offer, dict]":
    """The final answer when it needs no budget, else the (offer, subscription) that sets the
    budget. ``offers_for(live)``: {package_id: offer} for the live subscriptions' packages."""
    if not subscriptions:
        return Entitlement(False, "no_subscription", feature=feature)
    live = [s for s in subscriptions if s["status"] in ACCESS_STATUSES]
    if not live:
        return Entitlement(False, "subscription_inactive", feature=feature)
    offers = offers_for(live)
    candidates = [(offers[s["package_id"]], s) for s in live if s["package_id"] in offers]
    if not candidates:
        return Entitlement(False, "feature_not_in_package", feature=feature)
    if feature.type == FeatureType.BINARY:
        return Entitlement(True, "binary_access", feature=feature)
    return max(candidates, key=_rank)


def _decide(
    feature: Feature,
    offer: Offer,
    chosen: dict,
    *,
    period: tuple[datetime, datetime | None],
    members: list[int],
    used: Decimal,
    held: Decimal,
    delta: Decimal,
) -> Entitlement:
    consumption = Consumption(used=used, budget=offer.limit, held=held, overage_enabled=offer.overage_enabled)
    if offer.limit is None or used + held + delta <= offer.limit:
        access, reason = True, "within_limit"
    elif offer.overage_enabled:
        access, reason = True, "overage_enabled"
    else:
        access, reason = False, "limit_reached"
    return Entitlement(
        access,
        reason,
        consumption=consumption,
        period=period,
        owner=subject_key(user_pk=chosen["user_id"], group_pk=chosen["group_id"]),
        owner_user_pks=members,
        feature=feature,
        reset_period=offer.reset_period,
        anchor=chosen["started_at"],
    )


def evaluate(
    workspace: Workspace,
    subject: Subject,
    feature: Feature,
    *,
    delta: Decimal = Decimal(1),
    now: datetime | None = None,
) -> Entitlement:
    """The decision for ``delta`` more of ``feature`` at ``now`` (default: now)."""
    now = now or timezone.now()
    owners = Q(group_id__in=subject.group_pks) if subject.group_pks else Q(pk__in=[])
    if subject.user_pk is not None:
        owners |= Q(user_id=subject.user_pk)
    if subject.group_pk is not None:
        owners |= Q(group_id=subject.group_pk)
    subscriptions = list(
        Subscription.objects.for_workspace(workspace)
        .filter(owners)
        .values("pk", "user_id", "group_id", "package_id", "status", "started_at")
    )

    def offers_for(live):
        return {
            pf.package_id: Offer(pf.limit, pf.overage_enabled, pf.reset_period)
            for pf in PackageFeature.objects.for_workspace(workspace).filter(
                package_id__in={s["package_id"] for s in live}, feature_id=feature.pk
            )
        }

    chosen = _choose(feature, subscriptions, offers_for)
    if isinstance(chosen, Entitlement):
        return chosen
    offer, subscription = chosen
    period = period_containing(subscription["started_at"], offer.reset_period, now)
    owner = subject_key(user_pk=subscription["user_id"], group_pk=subscription["group_id"])
    members = _owner_members(workspace.pk, user_pk=subscription["user_id"], group_pk=subscription["group_id"])
    used = counters.period_used(workspace.pk, user_pks=members, feature_id=feature.pk, start=period[0], end=period[1])
    held = held_amount(workspace.pk, owner, feature.pk, now)
    return _decide(feature, offer, subscription, period=period, members=members, used=used, held=held, delta=delta)


# The columns of a Feature the decision reads; the others load on access (a deferred instance).
_FEATURE_COLUMNS = ["id", "workspace_id", "key", "type", "archived_at"]


def _choose_from_rows(feature: Feature, rows: list[tuple]) -> "Entitlement | tuple[Offer, dict]":
    """``_choose`` over ``reads.offers``' rows."""
    subscriptions = [
        {"pk": r[6], "user_id": r[7], "group_id": r[8], "package_id": r[9], "status": r[10], "started_at": r[11]}
        for r in rows
        if r[6] is not None
    ]
    offers = {r[9]: Offer(r[13], r[14], r[15]) for r in rows if r[12] is not None}
    return _choose(feature, subscriptions, lambda live: offers)


def _check_in_two_statements(
    workspace: Workspace, *, feature_key: str, user_id: str | None, group_id: str | None, delta: Decimal, now: datetime
) -> Entitlement:
    """``check`` on PostgreSQL: the same decision from ``reads.offers`` and ``reads.budget``."""
    rows = reads.offers(workspace.pk, feature_key=feature_key, user_id=user_id, group_id=group_id)
    feature_pk, feature_type, archived_at, user_pk, group_pk, group_pks = rows[0][:6]
    if feature_pk is None:
        return Entitlement(False, "unknown_feature")
    values = [feature_pk, workspace.pk, feature_key, feature_type, archived_at]
    feature = Feature.from_db(None, _FEATURE_COLUMNS, values)
    if (user_pk if user_id is not None else group_pk) is None:
        return Entitlement(False, "unknown_group" if user_id is None and group_id else "unknown_user", feature=feature)
    chosen = _choose_from_rows(feature, rows)
    if isinstance(chosen, Entitlement):
        return chosen
    offer, subscription = chosen
    period = period_containing(subscription["started_at"], offer.reset_period, now)
    used, held, members = reads.budget(
        workspace.pk,
        feature_id=feature_pk,
        user_pk=subscription["user_id"],
        group_pk=subscription["group_id"],
        owner=subject_key(user_pk=subscription["user_id"], group_pk=subscription["group_id"]),
        start=period[0],
        end=period[1],
        now=now,
    )
    return _decide(feature, offer, subscription, period=period, members=members, used=used, held=held, delta=delta)


def _feature(workspace: Workspace, key: str) -> Feature | None:
    return Feature.objects.for_workspace(workspace).filter(key=key).first()


def check(
    workspace: Workspace,
    *,
    feature_key: str,
    user_id: str | None = None,
    group_id: str | None = None,
    delta: Decimal = Decimal(1),
    now: datetime | None = None,
) -> Entitlement:
    """``canUseFeature``: an unknown user, group or feature is an answer (access false).

    Two statements on PostgreSQL (``reads``), the ORM's queries elsewhere: the same decision."""
    now = now or timezone.now()
    decide = _check_in_two_statements if reads.available() else _check_with_orm
    return decide(workspace, feature_key=feature_key, user_id=user_id, group_id=group_id, delta=delta, now=now)


def _check_with_orm(
    workspace: Workspace, *, feature_key: str, user_id: str | None, group_id: str | None, delta: Decimal, now: datetime
) -> Entitlement:
    feature = _feature(workspace, feature_key)
    if feature is None:
        return Entitlement(False, "unknown_feature")
    subject = find_subject(workspace, user_id=user_id, group_id=group_id)
    if subject is None:
        return Entitlement(False, "unknown_group" if user_id is None and group_id else "unknown_user", feature=feature)
    return evaluate(workspace, subject, feature, delta=delta, now=now)


# --- Recording usage: API records, consumes, commits -----------------------------------------


def _stored_answer(workspace: Workspace, key: str) -> dict | None:
    """The answer stored with the event of ``key``; {} for a key that is a Segment messageId
    (stored, but not by this API); None when nothing has the key yet."""
    payload = Event.objects.for_workspace(workspace).filter(message_id=key).values_list("payload", flat=True).first()
    return _answer_of(payload)


def _answer_of(payload) -> dict | None:
    """``_stored_answer`` from the event's payload (None: no event)."""
    if payload is None:
        return None
    kana = payload.get("kana") if isinstance(payload, dict) else None
    return (kana or {}).get("answer") or {}


def _record(
    workspace: Workspace,
    *,
    user_pk: int,
    external_user_id: str,
    feature: Feature,
    amount: Decimal,
    key: str,
    occurred_at: datetime,
    source: str,
    answer: dict,
    then_commit: bool = False,
) -> bool:
    """Store one usage event through the ledger (the only writer of events and usage); False
    when ``key`` was stored meanwhile by a concurrent request (a replay)."""
    message, decision = _usage_message(
        user_id=external_user_id,
        feature=feature,
        amount=amount,
        key=key,
        occurred_at=occurred_at,
        source=source,
        answer=answer,
    )
    return key in ledger.record_usage_events(workspace, [(message, decision, user_pk)], then_commit=then_commit)


def _usage_message(
    *, user_id: str, feature: Feature, amount: Decimal, key: str, occurred_at: datetime, source: str, answer: dict
) -> tuple[Message, Decision]:
    """The event (and its mapping) that records ``amount`` of ``feature`` under ``key``, with
    the ``answer`` a replay of the key answers."""
    payload = {
        "type": "track",
        "event": RECORDED_EVENT,
        "userId": user_id,
        "messageId": key,
        "timestamp": occurred_at.isoformat(),
        "properties": {"featureId": feature.key, "delta": number(amount)},
        "kana": {"source": source, "answer": answer},
    }
    message = Message(
        type=MessageType.TRACK,
        message_id=key,
        payload=payload,
        occurred_at=occurred_at,
        received_at=timezone.now(),
        user_id=user_id,
        name=RECORDED_EVENT,
        properties=payload["properties"],
    )
    return message, Decision(EventStatus.MAPPED, usages=[(feature.pk, amount, None)])


def _after(entitlement: Entitlement, amount: Decimal) -> dict | None:
    """The consumption once ``amount`` is recorded (the budget's usage grows by it)."""
    c = entitlement.consumption
    if c is None:
        return None
    return Consumption(used=c.used + amount, budget=c.budget, held=c.held, overage_enabled=c.overage_enabled).as_dict()


def _replay(workspace: Workspace, key: str, stored: dict) -> tuple[dict, bool]:
    if stored:
        return stored, True
    # A Segment messageId used as a key: stored, not by this API; nothing more is recorded.
    return {"recorded": False, "reason": "duplicate", "message": "this key is a stored messageId"}, True


def _live_feature(workspace: Workspace, feature_key: str) -> Feature:
    feature = _feature(workspace, feature_key)
    if feature is None:
        raise EntitlementError("unknown_feature", f"no feature {feature_key!r}", "feature", 404)
    if feature.archived_at is not None:
        raise EntitlementError("feature_archived", f"feature {feature_key!r} is archived: no new usage", "feature", 409)
    return feature


def record_usage(
    workspace: Workspace,
    *,
    user_id: str,
    feature_key: str,
    delta: Decimal,
    action: str,
    idempotency_key: str,
    occurred_at: datetime | None = None,
) -> tuple[dict, bool]:
    """``recordUsage``: add ``delta``, or ``set`` the period's used to it (the difference is
    recorded). Returns (answer, replayed): a replayed key answers its first answer."""
    feature = _live_feature(workspace, feature_key)

    @transaction.atomic
    def once() -> tuple[dict, bool]:
        stored = _stored_answer(workspace, idempotency_key)
        if stored is not None:
            return _replay(workspace, idempotency_key, stored)
        if suppressed_user_ids(workspace=workspace, user_ids={user_id}):
            # Its user was deleted: like Segment's suppress-and-delete, nothing more is stored for it.
            raise EntitlementError(
                "user_suppressed", "this userId belonged to a deleted user: no usage is recorded for it", "user_id", 409
            )
        user_pk = resolve_users(workspace=workspace, external_ids=[user_id])[user_id]
        subject = user_subject(workspace, user_pk)
        lock_keys(subject.lock_keys(workspace.pk, feature.pk))
        at = occurred_at or timezone.now()
        entitlement = evaluate(workspace, subject, feature, delta=Decimal(0), now=at)
        amount = delta
        if action == "set":
            used = entitlement.consumption.used if entitlement.consumption else _all_time(workspace, user_pk, feature)
            amount = delta - used
        if entitlement.consumption is not None:
            entitlement = evaluate(workspace, subject, feature, delta=amount, now=at)
        answer = {"recorded": True, "reason": entitlement.reason, "consumption": _after(entitlement, amount)}
        if not _record(
            workspace,
            user_pk=user_pk,
            external_user_id=user_id,
            feature=feature,
            amount=amount,
            key=idempotency_key,
            occurred_at=at,
            source="api:usage/records",
            answer=answer,
        ):
            return _replay(workspace, idempotency_key, _stored_answer(workspace, idempotency_key) or {})
        return answer, False

    return run_with_retries(once)


def _all_time(workspace: Workspace, user_pk: int, feature: Feature) -> Decimal:
    return counters.period_used(
        workspace.pk, user_pks=[user_pk], feature_id=feature.pk, start=datetime(1970, 1, 1, tzinfo=UTC), end=None
    )


def consume(
    workspace: Workspace, *, user_id: str, feature_key: str, delta: Decimal, idempotency_key: str
) -> tuple[dict, bool]:
    """Check and record in one atomic step: never overspends a hard limit, whatever the
    concurrency. Returns (answer, replayed). A refusal records nothing (and keeps the key free).

    Two round trips on PostgreSQL outside any transaction (``_consume_pipelined``)."""
    if pipelined.available():
        return _consume_pipelined(
            workspace, user_id=user_id, feature_key=feature_key, delta=delta, idempotency_key=idempotency_key
        )
    feature = _feature(workspace, feature_key)
    if feature is None:
        return {**Entitlement(False, "unknown_feature").as_dict(), "recorded": False}, False
    if feature.archived_at is not None:
        raise EntitlementError("feature_archived", f"feature {feature_key!r} is archived: no new usage", "feature", 409)
    user_pk = user_selectors.user_pk_for(workspace, user_id)
    if user_pk is None:
        return {**Entitlement(False, "unknown_user").as_dict(), "recorded": False}, False

    @transaction.atomic
    def once() -> tuple[dict, bool]:
        stored = _stored_answer(workspace, idempotency_key)
        if stored is not None:
            return _replay(workspace, idempotency_key, stored)
        subject = user_subject(workspace, user_pk)
        lock_keys(subject.lock_keys(workspace.pk, feature.pk))
        entitlement = evaluate(workspace, subject, feature, delta=delta)
        if not entitlement.access:
            return {**entitlement.as_dict(), "recorded": False}, False
        answer = {**entitlement.as_dict(), "recorded": True, "consumption": _after(entitlement, delta)}
        if not _record(
            workspace,
            user_pk=user_pk,
            external_user_id=user_id,
            feature=feature,
            amount=delta,
            key=idempotency_key,
            occurred_at=timezone.now(),
            source="api:entitlements/consume",
            answer=answer,
        ):
            return _replay(workspace, idempotency_key, _stored_answer(workspace, idempotency_key) or {})
        return answer, False

    return run_with_retries(once)


_STORED_PAYLOAD = f"SELECT payload FROM {Event._meta.db_table} WHERE workspace_id = %(ws)s AND message_id = %(key)s"
# A budget this process last found spent (``_SPENT``): the idempotency lookup beside its read.
_STORED_AND_BUDGET = "SELECT (" + _STORED_PAYLOAD.replace("{", "{{").replace("}", "}}") + "), b.* FROM ({budget}) AS b"


# Whether this transaction holds its budget's locks: "on" or "off", set (transaction-local) by
# the statements below so the ones after them in the same message know without a round trip.
_LOCKED_SETTING = "kana.budget_locked"
_IF = "current_setting('" + _LOCKED_SETTING + "', true) = '{}'"


def _try_locks(lock_names: list[str]) -> str:
    """Try each lock, in ``lock_keys_expressions``'s sorted order, without waiting; "on" if
    all were granted. Uncontended (the usual case), the budget is then read once, after them."""
    granted = "'on'"
    for name in reversed(lock_names):  # nested: the next key is tried only if this one was granted
        granted = f"CASE WHEN pg_try_advisory_xact_lock(%({name})s) THEN {granted} ELSE 'off' END"
    return f"SELECT set_config('{_LOCKED_SETTING}', {granted}, true)"


def _locked_if_room(budget_sql: str, locks: str) -> str:
    """When ``_try_locks`` found them held: the budget read before the locks, which waits for
    them only if it leaves room for the delta; the row of ``budget_sql`` plus a last column,
    null when the locks were not taken. No row when the locks were granted at once.

    A budget at its limit is where consumes pile up (every one of them refused): a refusal
    read this way records nothing and waits for no one, so the refusals of a spent budget no
    longer queue behind each other's round trips. It is a true answer at the moment of its
    read (under READ COMMITTED the statement sees every consume committed before it), and
    usage only shrinks under a budget by voids and moves, which a later consume sees. When
    there is room, the locks are taken and the decision is the one read after them
    (``_budget_and_record``), as before: zero overspend rests on that read alone."""
    # ``locks``: pg_advisory_xact_lock(…), … in sorted order (kana.locks.lock_keys_expressions).
    # CASE evaluates its THEN only when its WHEN holds; the arguments left to right. A
    # condition that names no column is checked once, before anything is read.
    return (
        f"SELECT b.*, CASE WHEN b.days_used + b.rows_used + b.held + %(room_delta)s <= %(room_limit)s"
        f" THEN num_nonnulls({locks}, set_config('{_LOCKED_SETTING}', 'on', true)) END"
        f" FROM ({budget_sql}) AS b (days_used, rows_used, held, members) WHERE {_IF.format('off')}"
    )


def _budget_and_record(budget_sql: str, record_sql: str, *, guarded: bool) -> str:
    """The budget read after the locks and the usage it grants, in one statement: one
    snapshot, taken once the locks were granted (the statements before it in the message took
    them), so it sees every consume of this budget that committed before (zero overspend
    rests on this read alone). ``d`` is the budget's row with whether ``delta`` stays
    ``within`` the limit and whether it is ``granted`` (within, or overage allowed): the
    same comparison as ``_decide``, on the same numbers. ``record_sql``: the ledger's CTEs
    (``ledger.guarded_usage_event``) storing the event for ``d WHERE d.granted``.

    Its row: the budget's columns and whether the event was stored. ``guarded``: only if
    ``_try_locks``/``_locked_if_room`` took the locks (no row otherwise: a spent budget's
    refusal read before them reads its usage rows once)."""
    where = f" WHERE {_IF.format('on')}" if guarded else ""
    return (
        # MATERIALIZED: read once; inlined, each use of a column below ran its sum again.
        f"WITH b (days_used, rows_used, held, members) AS MATERIALIZED (SELECT * FROM ({budget_sql}) AS b0{where}),"
        " c AS (SELECT b.*, b.days_used + b.rows_used AS used FROM b),"
        " w AS (SELECT c.*, (%(c_limit)s::numeric IS NULL"
        " OR c.used + c.held + %(c_delta)s::numeric <= %(c_limit)s::numeric) AS within FROM c),"
        " d AS (SELECT w.*, (w.within OR %(c_overage)s::boolean) AS granted FROM w), "
        + record_sql
        + " SELECT d.days_used, d.rows_used, d.held, d.members, EXISTS (SELECT FROM ev) FROM d"
    )


# The stored answer of a consume the budget statement grants: the answer rendered in Python
# for its reason (within the limit, or over it with overage), its consumption (the budget once
# the delta is recorded, as ``_after``) filled in from the row the decision read. Numbers as
# ``number`` shows them: ``trim_scale`` drops a numeric's trailing zeros, so a whole amount is
# a JSON integer, read back as an int, and any other a decimal, read back as the same float.
_GRANTED_PAYLOAD = (
    "jsonb_set(CASE WHEN d.within THEN %(c_payload_within)s::jsonb ELSE %(c_payload_over)s::jsonb END,"
    " '{kana,answer,consumption}', jsonb_build_object("
    "'used', trim_scale(d.used + %(c_delta)s::numeric),"
    " 'budget', trim_scale(%(c_limit)s::numeric),"
    " 'remaining', CASE WHEN %(c_limit)s::numeric IS NOT NULL THEN"
    " trim_scale(greatest(%(c_limit)s::numeric - (d.used + %(c_delta)s::numeric) - d.held, 0)) END,"
    " 'held', trim_scale(d.held),"
    " 'overage_enabled', %(c_overage)s::boolean))"
)


# Hard-limit budgets this process last found spent: (workspace, owner, feature, period start,
# limit). A consume of one first reads the budget alone, in a message without locks or insert
# (in ``_consume_pipelined``): the refusals of a spent budget (most of S7's hot half) cost one
# indexed read, not the locks' tries and the insert's statement and triggers. Only a refusal
# is answered that way, a true answer at the moment of its read (as ``_locked_if_room``'s);
# a budget with room again goes on to the locked decision. Per process, bounded, never stale
# in what it answers: it only chooses which message is sent first.
_SPENT: set[tuple] = set()
_SPENT_MAX = 4096


def _remember_spent(key: tuple, spent: bool) -> None:
    if not spent:
        _SPENT.discard(key)
        return
    if len(_SPENT) >= _SPENT_MAX:
        _SPENT.clear()
    _SPENT.add(key)


# The offers' rows (``reads.offers``) of subjects whose budget this process last refused as
# spent, by (workspace, user id, feature key), for ``_consume_pipelined``: only a guess of
# what the next consume of the subject reads, always checked against the rows read beside it.
_SPENT_OFFERS: dict[tuple[int, str, str], list[tuple]] = {}


class _OffersChanged(Exception):
    """The offers read beside a spent budget's read are not the ones it was made for."""

    def __init__(self, rows: list[tuple]):
        super().__init__("the subject's offers changed")
        self.rows = rows


def _remember_spent_offers(subject_id: tuple[int, str, str], rows: list[tuple]) -> None:
    if subject_id not in _SPENT_OFFERS and len(_SPENT_OFFERS) >= _SPENT_MAX:
        _SPENT_OFFERS.clear()
    _SPENT_OFFERS[subject_id] = rows


# The last period found per (anchor, reset period) in this process. Periods partition time
# from their anchor (``entitlements.periods``), so a remembered period that contains ``now`` is
# the one ``period_containing`` computes again (≈ 8 µs a consume: its boundaries' month
# arithmetic). Bounded as ``_SPENT``; a ``never`` period (no end) is not kept.
_PERIODS: dict[tuple[datetime, str], tuple[datetime, datetime]] = {}
_PERIODS_MAX = 4096


def _period_at(anchor: datetime, reset_period: str, now: datetime) -> tuple[datetime, datetime | None]:
    """``period_containing(anchor, reset_period, now)``."""
    key = (anchor, reset_period)
    period = _PERIODS.get(key)
    if period is not None and period[0] <= now < period[1]:
        return period
    period = period_containing(anchor, reset_period, now)
    if period[1] is not None:
        if len(_PERIODS) >= _PERIODS_MAX:
            _PERIODS.clear()
        _PERIODS[key] = period
    return period


def _consume_pipelined(
    workspace: Workspace, *, user_id: str, feature_key: str, delta: Decimal, idempotency_key: str
) -> tuple[dict, bool]:
    """``consume`` in two round trips (was thirteen in round 3, three in round 5):

    1. ``reads.offers`` (autocommit): the feature, the user, its groups, its subscriptions and
       their packages' rows for the feature: the offer and its period are chosen from them;
    2. one message (a libpq pipeline, its values bound server-side: ``kept_cursor.message_results``):
       ``BEGIN``, the idempotency lookup, the budget's advisory locks, then one
       statement that reads the period's used and held amounts (``reads.budget_statement``)
       and stores the usage they grant (``_budget_and_record``), and ``COMMIT``. The locks
       are held only while the server runs the rest of that message: no client round trip,
       no Python, happens under them. A hard limit's locks are tried first (``_try_locks``);
       when another consume holds them, they are waited for only if the budget read before
       them leaves room (``_locked_if_room``): a spent budget's refusals wait for no lock.

    The decision is made twice on the same numbers: in SQL, to store the usage in the
    statement that read the budget, and in Python (``_decide``), to answer; the stored answer
    (what a replay answers) is the Python-rendered one with the consumption filled in by SQL
    (``_GRANTED_PAYLOAD``). tests/test_entitlement_reads.py holds the answers, first and
    replayed, equal to the ORM path's.

    A budget this process last found spent (``_SPENT``) is first read with the idempotency
    lookup in one statement outside any transaction (``_STORED_AND_BUDGET``): no lock, no insert.

    The usage is recorded at the time its budget was read (``now``), so it lands in the period
    it was checked against even when the locks waited across a period boundary.

    A subject whose budget this process last refused as spent (``_SPENT_OFFERS``) has its
    offers read in the same round trip as that budget read, the read made for the offers
    this process last read for it: one round trip for its next refusal. Offers read
    otherwise (a subscription, package or feature changed) void that read; the consume
    starts again from them.
    """
    request = {"user_id": user_id, "feature_key": feature_key, "delta": delta, "idempotency_key": idempotency_key}
    guessed = _SPENT_OFFERS.get((workspace.pk, user_id, feature_key))
    if guessed is not None:
        try:
            return _consume_with_offers(workspace, guessed, guessed=True, **request)
        except _OffersChanged as changed:
            rows = changed.rows
    else:
        rows = reads.offers(workspace.pk, feature_key=feature_key, user_id=user_id, group_id=None)
    return _consume_with_offers(workspace, rows, guessed=False, **request)


def _consume_with_offers(
    workspace: Workspace,
    rows: list[tuple],
    *,
    guessed: bool,
    user_id: str,
    feature_key: str,
    delta: Decimal,
    idempotency_key: str,
) -> tuple[dict, bool]:
    """``_consume_pipelined`` given the subject's offers' rows (``reads.offers``), or the
    rows this process last read for a subject it found spent (``_SPENT_OFFERS``, ``guessed``),
    which the spent budget's read checks (``_OffersChanged`` when they differ)."""
    subject_id = (workspace.pk, user_id, feature_key)
    feature_pk, feature_type, archived_at, user_pk, _, group_pks = rows[0][:6]
    if feature_pk is None:
        return {**Entitlement(False, "unknown_feature").as_dict(), "recorded": False}, False
    if archived_at is not None:
        raise EntitlementError("feature_archived", f"feature {feature_key!r} is archived: no new usage", "feature", 409)
    if user_pk is None:
        return {**Entitlement(False, "unknown_user").as_dict(), "recorded": False}, False
    values = [feature_pk, workspace.pk, feature_key, feature_type, archived_at]
    feature = Feature.from_db(None, _FEATURE_COLUMNS, values)
    subject = Subject(user_pk=user_pk, group_pks=tuple(group_pks))
    chosen = _choose_from_rows(feature, rows)

    def granted_payloads(message: Message, period, overage_enabled: bool) -> dict:
        """The stored payload of a grant for each reason it may have (``_GRANTED_PAYLOAD``):
        ``message``'s payload with that reason's answer (the message is built once a
        consume, not again per reason: its payload differs only in the answer)."""
        kana = message.payload["kana"]
        texts = {}
        for reason in ("within_limit", "overage_enabled") if overage_enabled else ("within_limit",):
            kana["answer"] = {**Entitlement(True, reason, period=period).as_dict(), "recorded": True}
            texts[reason] = message.payload_text()
        return texts

    def once() -> tuple[dict, bool]:
        now = timezone.now()
        params = {"ws": workspace.pk, "key": idempotency_key}
        if not isinstance(chosen, Entitlement):
            offer, subscription = chosen
            period = _period_at(subscription["started_at"], offer.reset_period, now)
            owner = subject_key(user_pk=subscription["user_id"], group_pk=subscription["group_id"])
            budget_sql, budget_params = reads.budget_statement(
                workspace.pk,
                feature_id=feature.pk,
                user_pk=subscription["user_id"],
                group_pk=subscription["group_id"],
                owner=owner,
                start=period[0],
                end=period[1],
                now=now,
            )
            params |= budget_params
            refusable = offer.limit is not None and not offer.overage_enabled
            spent_key = (workspace.pk, owner, feature.pk, period[0], offer.limit)
            if refusable and spent_key in _SPENT:
                # One statement, outside any transaction: the idempotency lookup and the
                # budget read in one snapshot (a transaction of two reads under READ
                # COMMITTED gave each its own), its values bound server-side.
                stored_and_budget = _STORED_AND_BUDGET.format(budget=budget_sql)
                if guessed:
                    params |= {"offers_feature": feature_key, "user_id": user_id, "group_id": None}
                    fresh, ((stored, *budget_row),) = reads.message_results(
                        [
                            kept_cursor.Statement(reads.OFFERS_BESIDE_BUDGET_SQL, params, prepare=True),
                            kept_cursor.Statement(stored_and_budget, params, prepare=True),
                        ]
                    )
                    if fresh != rows:
                        _SPENT_OFFERS.pop(subject_id, None)
                        raise _OffersChanged(fresh)
                else:
                    ((stored, *budget_row),) = reads.rows(stored_and_budget, params)
                if stored is not None:
                    payload = json.loads(stored) if isinstance(stored, str) else stored
                    return _replay(workspace, idempotency_key, _answer_of(payload))
                used, held, members = reads.budget_of(budget_row)
                entitlement = _decide(
                    feature, offer, subscription, period=period, members=members, used=used, held=held, delta=delta
                )
                if not entitlement.access:
                    _remember_spent_offers(subject_id, rows)
                    return {**entitlement.as_dict(), "recorded": False}, False
                _remember_spent(spent_key, False)  # room again: decided under the locks below
                _SPENT_OFFERS.pop(subject_id, None)
        lock_expressions, lock_params = lock_keys_expressions(subject.lock_keys(workspace.pk, feature.pk))
        lock_sql = "SELECT " + lock_expressions
        params |= lock_params
        # (statement, prepared): sent in one round trip, the values bound server-side.
        statements = [("BEGIN", False), (_STORED_PAYLOAD, True)]
        message, decision = _usage_message(
            user_id=user_id,
            feature=feature,
            amount=delta,
            key=idempotency_key,
            occurred_at=now,
            source="api:entitlements/consume",
            answer={},  # the payload is the statement's (``_GRANTED_PAYLOAD``)
        )
        if isinstance(chosen, Entitlement):
            if chosen.access:  # binary: recorded with the answer as it is
                answer = {**chosen.as_dict(), "recorded": True, "consumption": None}
                message.payload["kana"]["answer"] = answer
                record_sql, record_params = ledger.guarded_usage_event(
                    workspace,
                    message,
                    decision,
                    user_pk,
                    rows="(VALUES (true)) AS d (granted)",
                    payload="%(c_payload)s::jsonb",
                )
                statements.append((lock_sql, False))
                statements.append(("WITH " + record_sql + " SELECT EXISTS (SELECT FROM ev)", True))
                params |= record_params | {"c_payload": message.payload_text()}
        else:
            if not refusable:
                statements.append((lock_sql, False))  # never refused: no read before the locks
            else:
                statements.append((_try_locks(list(lock_params)), True))
                statements.append((_locked_if_room(budget_sql, lock_expressions), True))
                params |= {"room_delta": delta, "room_limit": offer.limit}
            record_sql, record_params = ledger.guarded_usage_event(
                workspace, message, decision, user_pk, rows="d WHERE d.granted", payload=_GRANTED_PAYLOAD
            )
            statements.append((_budget_and_record(budget_sql, record_sql, guarded=refusable), True))
            payloads = granted_payloads(message, period, offer.overage_enabled)
            params |= record_params
            params |= {
                "c_delta": delta,
                "c_limit": offer.limit,
                # As text: boolean's input reads it (a bool would leave the message to psycopg).
                "c_overage": "true" if offer.overage_enabled else "false",
                "c_payload_within": payloads["within_limit"],
                # Without overage a grant is always within the limit: this one is never stored.
                "c_payload_over": payloads.get("overage_enabled", payloads["within_limit"]),
            }
        statements.append(("COMMIT", False))
        with pipelined.transaction():
            results = reads.message_results(
                [kept_cursor.Statement(sql, params, prepare=prepare) for sql, prepare in statements]
            )
            stored = results[1][0] if results[1] else None
            if stored is not None:
                payload = json.loads(stored[0]) if isinstance(stored[0], str) else stored[0]
                return _replay(workspace, idempotency_key, _answer_of(payload))
            if isinstance(chosen, Entitlement):
                if not chosen.access:
                    return {**chosen.as_dict(), "recorded": False}, False
                if results[3][0][0]:  # after the locks
                    return answer, False
            else:
                before_locks = None
                if refusable:
                    before_locks = results[3][0] if results[3] else None  # None: the tried locks were granted
                budget_rows = results[-2]  # none when the locks were not taken
                recorded = False
                if before_locks is not None and before_locks[4] is None:
                    # Refused on what was committed before any lock (see _locked_if_room).
                    budget_row = before_locks[:4]
                else:
                    budget_row, recorded = budget_rows[0][:4], budget_rows[0][4]
                used, held, members = reads.budget_of(budget_row)
                entitlement = _decide(
                    feature, offer, subscription, period=period, members=members, used=used, held=held, delta=delta
                )
                if refusable:
                    _remember_spent(spent_key, not entitlement.access)
                    if entitlement.access:
                        _SPENT_OFFERS.pop(subject_id, None)
                    else:
                        _remember_spent_offers(subject_id, rows)
                if not entitlement.access:
                    return {**entitlement.as_dict(), "recorded": False}, False
                if recorded:
                    return {
                        **entitlement.as_dict(),
                        "recorded": True,
                        "consumption": _after(entitlement, delta),
                    }, False
        # Granted, but the key was stored meanwhile by a concurrent request (its insert won).
        return _replay(workspace, idempotency_key, _stored_answer(workspace, idempotency_key) or {})

    return run_with_retries(once)


# --- Reservations ---------------------------------------------------------------------------


def reservation_status(reservation: Reservation, now: datetime | None = None) -> str:
    """As shown: a hold past its expiry is expired even before the sweep marks it."""
    if reservation.status == ReservationStatus.HELD and reservation.expires_at <= (now or timezone.now()):
        return ReservationStatus.EXPIRED
    return reservation.status


def reservation_create(
    workspace: Workspace, *, user_id: str, feature_key: str, amount: Decimal, ttl_seconds: int, idempotency_key: str
) -> tuple[Reservation, bool]:
    """Hold ``amount`` of the budget for ``ttl_seconds``; (reservation, created). The same key
    again answers the same reservation. Refused with 409 and the decision's reason code."""
    feature = _feature(workspace, feature_key)
    user_pk = user_selectors.user_pk_for(workspace, user_id) if feature is not None else None

    @transaction.atomic
    def once() -> tuple[Reservation, bool]:
        existing = Reservation.objects.for_workspace(workspace).filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing, False
        if feature is None or user_pk is None:
            reason = "unknown_feature" if feature is None else "unknown_user"
            raise EntitlementError(reason, MESSAGES[reason], "feature" if feature is None else "user_id", 409)
        subject = user_subject(workspace, user_pk)
        lock_keys(subject.lock_keys(workspace.pk, feature.pk))
        now = timezone.now()
        entitlement = evaluate(workspace, subject, feature, delta=amount, now=now)
        if not entitlement.access:
            raise EntitlementError(entitlement.reason, MESSAGES[entitlement.reason], None, 409)
        reservation = Reservation.objects.create(
            workspace=workspace,
            user_id=user_pk,
            subject=entitlement.owner or subject_key(user_pk=user_pk),
            feature=feature,
            amount=amount,
            idempotency_key=idempotency_key,
            expires_at=now + timedelta(seconds=ttl_seconds),
        )
        return reservation, True

    return run_with_retries(once)


def reservation_commit(workspace: Workspace, *, reservation_id: int, amount: Decimal | None = None) -> Reservation:
    """Record the held usage (``amount``, at most the hold; default all of it). Idempotent."""

    @transaction.atomic
    def once() -> Reservation:
        reservation = (
            Reservation.objects.for_workspace(workspace)
            .select_for_update()
            .select_related("user", "feature")
            .get(pk=reservation_id)
        )
        if reservation.status in (ReservationStatus.COMMITTED, ReservationStatus.EXPIRED):
            return reservation
        if reservation.status == ReservationStatus.RELEASED:
            raise EntitlementError("reservation_released", "the hold was released", None, 409)
        now = timezone.now()
        if reservation_status(reservation, now) == ReservationStatus.EXPIRED:
            _finish(reservation, ReservationStatus.EXPIRED, now)  # kept: the refusal is raised after commit
            return reservation
        committed = reservation.amount if amount is None else amount
        if committed > reservation.amount or committed < 0:
            raise EntitlementError("invalid_amount", "a commit is 0 up to the held amount", "amount", 400)
        _record(
            workspace,
            user_pk=reservation.user_id,
            external_user_id=reservation.user.user_id or "",
            feature=reservation.feature,
            amount=committed,
            key=f"kana-reservation-{reservation.pk}",
            occurred_at=now,
            source="api:entitlements/reservations/commit",
            answer={"reservation": reservation.pk},
        )
        reservation.committed_amount = committed
        _finish(reservation, ReservationStatus.COMMITTED, now)
        return reservation

    reservation = run_with_retries(once)
    if reservation.status == ReservationStatus.EXPIRED:
        raise EntitlementError("reservation_expired", "the hold expired before its commit", None, 409)
    return reservation


def reservation_release(workspace: Workspace, *, reservation_id: int) -> Reservation:
    """Free the hold. Idempotent; an expired hold stays expired; a committed one cannot."""
    with transaction.atomic():
        reservation = Reservation.objects.for_workspace(workspace).select_for_update().get(pk=reservation_id)
        if reservation.status == ReservationStatus.COMMITTED:
            raise EntitlementError("reservation_committed", "the hold was committed", None, 409)
        if reservation.status == ReservationStatus.HELD:
            now = timezone.now()
            expired = reservation_status(reservation, now) == ReservationStatus.EXPIRED
            _finish(reservation, ReservationStatus.EXPIRED if expired else ReservationStatus.RELEASED, now)
        return reservation


def _finish(reservation: Reservation, status: str, now: datetime) -> None:
    reservation.status, reservation.finished_at = status, now
    reservation.save(update_fields=["status", "finished_at", "committed_amount"])


def expire_reservations(now: datetime | None = None) -> int:
    """The periodic sweep: holds past their expiry become expired (reads ignore them already)."""
    now = now or timezone.now()
    return Reservation.objects.filter(status=ReservationStatus.HELD, expires_at__lte=now).update(
        status=ReservationStatus.EXPIRED, finished_at=now
    )


def usage_history(
    workspace: Workspace,
    *,
    feature_key: str,
    user_id: str | None = None,
    group_id: str | None = None,
    past: int = 6,
    now: datetime | None = None,
) -> dict:
    """``showUsage``: the current period's consumption and up to ``past`` earlier periods'
    (newest first, none before the anchor), each read from the counters."""
    now = now or timezone.now()
    entitlement = check(
        workspace, feature_key=feature_key, user_id=user_id, group_id=group_id, delta=Decimal(0), now=now
    )
    consumption = entitlement.consumption
    if consumption is None:
        return {"reason": entitlement.reason, "current": None, "past": []}
    earlier = []
    for start, end in past_periods(entitlement.anchor, entitlement.reset_period, now, past):
        used = counters.period_used(
            workspace.pk, user_pks=entitlement.owner_user_pks, feature_id=entitlement.feature.pk, start=start, end=end
        )
        spent = Consumption(used=used, budget=consumption.budget, overage_enabled=consumption.overage_enabled)
        earlier.append({**period_dict((start, end)), "consumption": spent.as_dict()})
    return {
        "reason": entitlement.reason,
        "current": {**period_dict(entitlement.period), "consumption": consumption.as_dict()},
        "past": earlier,
    }
