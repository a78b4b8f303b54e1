"""Recording validated messages: every one is stored, usage is decided, users are resolved.

The service behind every ingest edge (Segment's endpoints today). Usage messages (track,
page, screen) are handled in bulk, one transaction per run of consecutive usage messages,
with a fixed number of queries whatever the run's length: rules lock + version + replay
check, userId resolution, then ``ledger.record_usage_events`` (events and their usage in
one statement, or COPY into staging tables for longer runs). Identify, alias and group are
applied one at a time, in order, by the identity service of ``users``, and stored by the
ledger as processed events.
"""

from dataclasses import dataclass, field

from django.db import transaction

from kana.models import Workspace
from kana.retries import ConcurrentChange, run_with_retries
from users import services as user_services
from users.profile import UNSET, validated_changes

from . import ledger
from .incoming import Message
from .mapping import decide, load_rule_set
from .models import USAGE_TYPES, Event, EventStatus, MessageType

BILLING_TRAITS = ("billingUserId", "billingId")
PROFILE_TRAITS = {"name", "email", *BILLING_TRAITS}
ENGAGE_CLASSES = {"audience", "trait"}


@dataclass
class Outcome:
    message_id: str
    status: str  # mapped, unmapped, processed, or duplicate (a replay: nothing changed)
    reason: str = ""
    user_pk: int | None = None
    warnings: list[dict] = field(default_factory=list)


def ingest_messages(*, workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    """Apply messages in order; returns one outcome per message, in the same order.

    Consecutive usage messages are recorded together, and so are consecutive identifies and
    consecutive group calls; alias messages one at a time.
    """
    outcomes: list[Outcome] = []
    run: list[Message] = []

    def flush() -> None:
        if run and run[0].type in USAGE_TYPES:
            outcomes.extend(ingest_usage_messages(workspace=workspace, messages=run))
        elif run and run[0].type == MessageType.GROUP:
            outcomes.extend(ingest_group_messages(workspace=workspace, messages=run))
        elif run:
            outcomes.extend(ingest_identify_messages(workspace=workspace, messages=run))
        run.clear()

    for message in messages:
        kind = _run_kind(message)
        if run and _run_kind(run[0]) != kind:
            flush()
        if kind is None:
            outcomes.append(ingest_profile_message(workspace=workspace, message=message))
        else:
            run.append(message)
    flush()
    return outcomes


def _run_kind(message: Message) -> str | None:
    if message.type in USAGE_TYPES:
        return "usage"
    return message.type if message.type in (MessageType.IDENTIFY, MessageType.GROUP) else None


def ingest_usage_messages(*, workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    return run_with_retries(lambda: _ingest_usage_once(workspace, messages))


@transaction.atomic
def _ingest_usage_once(workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    version, replayed = ledger.lock_rules_and_find_replays(workspace, {m.message_id for m in messages})
    fresh: dict[str, Message] = {}
    for message in messages:
        if message.message_id not in replayed and message.message_id not in fresh:
            fresh[message.message_id] = message
    if not fresh:
        return [Outcome(m.message_id, "duplicate") for m in messages]

    rule_set = load_rule_set(workspace.pk, version)
    user_pks = user_services.resolve_users(workspace=workspace, external_ids={m.user_id for m in fresh.values()})
    decided = [(m, decide(rule_set, m.name, m.properties), user_pks[m.user_id]) for m in fresh.values()]
    stored = ledger.record_usage_events(workspace, decided)
    by_id = {m.message_id: Outcome(m.message_id, d.status, d.reason, user_pk) for m, d, user_pk in decided}
    outcomes, seen = [], set()
    for message in messages:
        if message.message_id in stored and message.message_id not in seen:
            outcomes.append(by_id[message.message_id])
            seen.add(message.message_id)
        else:
            outcomes.append(Outcome(message.message_id, "duplicate"))
    return outcomes


def ingest_profile_message(*, workspace: Workspace, message: Message) -> Outcome:
    """One alias message, in a transaction of its own."""
    return run_with_retries(lambda: _ingest_profile_once(workspace, message))


def engage_values(message: Message) -> dict:
    """Engage audience/computed-trait values carried by an identify, name -> value."""
    context = message.payload.get("context")
    personas = context.get("personas") if isinstance(context, dict) else None
    if not isinstance(personas, dict) or personas.get("computation_class") not in ENGAGE_CLASSES:
        return {}
    key = personas.get("computation_key")
    if isinstance(key, str) and key in message.traits:
        return {key: message.traits[key]}
    return {k: v for k, v in message.traits.items() if k not in PROFILE_TRAITS}


# Identifies applied per transaction: two advisory locks each (userId, email), far below
# PostgreSQL's lock table, and a batch of 2,500 in 25 passes of a few statements.
IDENTIFY_CHUNK = 100


def ingest_identify_messages(*, workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    """A run of identify messages, a chunk per transaction, through the identity engine's
    set-based pass (``users.services.identify_users``): the same outcomes as one at a time."""
    outcomes: list[Outcome] = []
    pending = list(messages)
    while pending:
        chunk = pending[:IDENTIFY_CHUNK]
        done = run_with_retries(lambda chunk=chunk: _ingest_identify_chunk(workspace, chunk))
        outcomes.extend(done)
        pending = pending[len(done) :]
    return outcomes


@transaction.atomic
def _ingest_identify_chunk(workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    """Outcomes of a prefix of ``messages`` (at least one): see ``identify_users``."""
    replayed = ledger.stored_message_ids(workspace, {m.message_id for m in messages})
    fresh: dict[str, tuple[Message, list[dict]]] = {}
    identifies = []
    for message in messages:
        if message.message_id in replayed or message.message_id in fresh:
            continue
        changes, warnings = _identify_changes(message)
        fresh[message.message_id] = (message, warnings)
        row = user_services.ProfileRow(changes=changes, user_id=message.user_id, label=f"message:{message.message_id}")
        identifies.append((row, message.occurred_at))
    results = user_services.identify_users(workspace=workspace, identifies=identifies) if identifies else []
    applied = []
    for (row, _), result in zip(identifies, results, strict=False):  # results: a prefix
        message, warnings = fresh[row.label.removeprefix("message:")]
        if result.ambiguous:
            warnings.append(_AMBIGUOUS_EMAIL_WARNING)
        applied.append((message, result.user.pk, warnings))
    stored = ledger.record_processed_events(workspace, applied)
    if len(stored) != len(applied):
        raise ConcurrentChange()  # a concurrent request stored one of them: redo without it
    processed = {m.message_id: Outcome(m.message_id, EventStatus.PROCESSED, "", pk, w) for m, pk, w in applied}
    outcomes = []
    for message in messages:
        message_id = message.message_id
        if message_id in fresh and message_id not in processed:
            break  # not applied in this pass: the caller sends it, and what follows, again
        first = processed.pop(message_id, None)
        outcomes.append(first or Outcome(message_id, "duplicate"))
    return outcomes


def ingest_group_messages(*, workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    """A run of group calls, a chunk per transaction, set-based (``users.services.record_groups``)."""
    outcomes: list[Outcome] = []
    for start in range(0, len(messages), GROUP_CHUNK):
        chunk = messages[start : start + GROUP_CHUNK]
        outcomes.extend(run_with_retries(lambda chunk=chunk: _ingest_group_chunk(workspace, chunk)))
    return outcomes


GROUP_CHUNK = 500


@transaction.atomic
def _ingest_group_chunk(workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    replayed = ledger.stored_message_ids(workspace, {m.message_id for m in messages})
    fresh: dict[str, Message] = {}
    for message in messages:
        if message.message_id not in replayed:
            fresh.setdefault(message.message_id, message)
    user_pks = user_services.resolve_users(workspace=workspace, external_ids={m.user_id for m in fresh.values()})
    calls = [user_services.GroupCall(user_pks[m.user_id], m.group_id, m.traits, m.occurred_at) for m in fresh.values()]
    user_services.record_groups(workspace=workspace, calls=calls)
    applied = [(m, user_pks[m.user_id], list(m.warnings)) for m in fresh.values()]
    if len(ledger.record_processed_events(workspace, applied)) != len(applied):
        raise ConcurrentChange()  # a concurrent request stored one of them: redo without it
    processed = {m.message_id: Outcome(m.message_id, EventStatus.PROCESSED, "", pk, w) for m, pk, w in applied}
    return [processed.pop(m.message_id, None) or Outcome(m.message_id, "duplicate") for m in messages]


_AMBIGUOUS_EMAIL_WARNING = {
    "code": "ambiguous_email_match",
    "message": "the email matches several users, one without a userId: not merged, flagged for review",
    "field": "traits.email",
}


def _identify_changes(message: Message) -> tuple:
    """The profile changes an identify carries, and warnings for the values refused."""
    traits = message.traits
    billing = UNSET
    for key in BILLING_TRAITS:
        if key in traits:
            billing = traits[key]
            break
    changes, problems = validated_changes(
        name=traits.get("name", UNSET),
        email=traits.get("email", UNSET),
        billing_id=billing,
        audiences=engage_values(message),
    )
    warnings = list(message.warnings)
    warnings.extend({"code": p.code, "message": p.message, "field": f"traits.{p.field}"} for p in problems)
    return changes, warnings


class _ReplayedMeanwhile(Exception):
    """A concurrent request stored the same messageId first: undo this one's changes."""


def _ingest_profile_once(workspace: Workspace, message: Message) -> Outcome:
    try:
        with transaction.atomic():
            return _apply_profile_message(workspace, message)
    except _ReplayedMeanwhile:
        return Outcome(message.message_id, "duplicate")


def _apply_profile_message(workspace: Workspace, message: Message) -> Outcome:
    """An alias message (identify and group calls go through their set-based runs)."""
    if Event.objects.for_workspace(workspace).filter(message_id=message.message_id).exists():
        return Outcome(message.message_id, "duplicate")
    warnings = list(message.warnings)
    result = user_services.alias_user(
        workspace=workspace,
        previous_id=message.previous_id,
        user_id=message.user_id,
        occurred_at=message.occurred_at,
        source=f"message:{message.message_id}",
    )
    user_pk = result.user.pk
    if not ledger.record_processed_event(workspace, message, user_pk, warnings):
        raise _ReplayedMeanwhile()
    return Outcome(message.message_id, EventStatus.PROCESSED, user_pk=user_pk, warnings=warnings)
