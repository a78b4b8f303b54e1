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
from kana.retries import run_with_retries
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
    """Apply messages in order; returns one outcome per message, in the same order."""
    outcomes: list[Outcome] = []
    usage_run: list[Message] = []
    for message in messages:
        if message.type in USAGE_TYPES:
            usage_run.append(message)
            continue
        if usage_run:
            outcomes.extend(ingest_usage_messages(workspace=workspace, messages=usage_run))
            usage_run = []
        outcomes.append(ingest_profile_message(workspace=workspace, message=message))
    if usage_run:
        outcomes.extend(ingest_usage_messages(workspace=workspace, messages=usage_run))
    return outcomes


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


class _ReplayedMeanwhile(Exception):
    """A concurrent request stored the same messageId first: undo this one's changes."""


def _ingest_profile_once(workspace: Workspace, message: Message) -> Outcome:
    try:
        with transaction.atomic():
            return _apply_profile_message(workspace, message)
    except _ReplayedMeanwhile:
        return Outcome(message.message_id, "duplicate")


def _apply_profile_message(workspace: Workspace, message: Message) -> Outcome:
    if Event.objects.for_workspace(workspace).filter(message_id=message.message_id).exists():
        return Outcome(message.message_id, "duplicate")
    warnings = list(message.warnings)
    if message.type == MessageType.IDENTIFY:
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
        warnings.extend({"code": p.code, "message": p.message, "field": f"traits.{p.field}"} for p in problems)
        result = user_services.identify_user(
            workspace=workspace,
            user_id=message.user_id,
            changes=changes,
            occurred_at=message.occurred_at,
            source=f"message:{message.message_id}",
        )
        if result.ambiguous:
            warnings.append(
                {
                    "code": "ambiguous_email_match",
                    "message": "the email matches several users, one without a userId: not merged, flagged for review",
                    "field": "traits.email",
                }
            )
        user_pk = result.user.pk
    elif message.type == MessageType.ALIAS:
        result = user_services.alias_user(
            workspace=workspace,
            previous_id=message.previous_id,
            user_id=message.user_id,
            occurred_at=message.occurred_at,
            source=f"message:{message.message_id}",
        )
        user_pk = result.user.pk
    else:  # group
        user_pk = user_services.resolve_users(workspace=workspace, external_ids=[message.user_id])[message.user_id]
        user_services.record_group(
            workspace=workspace,
            user_pk=user_pk,
            group_id=message.group_id,
            traits=message.traits,
            occurred_at=message.occurred_at,
        )
    if not ledger.record_processed_event(workspace, message, user_pk, warnings):
        raise _ReplayedMeanwhile()
    return Outcome(message.message_id, EventStatus.PROCESSED, user_pk=user_pk, warnings=warnings)
