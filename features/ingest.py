"""Recording validated messages: every one is stored, usage is decided, users are resolved.

The service behind every ingest edge (Segment's endpoints today). Usage messages (track,
page, screen) are handled in bulk, one transaction per run of consecutive usage messages,
with a fixed number of queries whatever the run's length: rules lock + version + replay
check, userId resolution, then ``ledger.record_usage_events`` (events and their usage in
one statement; longer runs send their rows as JSON documents). A single one of a userId that
has a user is first tried in one round trip, decided with the rules this process holds
(``_record_known_user_usage``). Identify, alias and group are applied one at a time, in
order, by the identity service of ``users``, and stored by the ledger as processed events.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

from django.db import IntegrityError, OperationalError, connection, transaction

from kana.db import pipelined, prepared
from kana.locks import lock_rules_shared
from kana.models import AnonymousEvents, Workspace
from kana.retries import ConcurrentChange, is_retryable, run_with_retries
from users import services as user_services
from users.profile import UNSET, validated_changes

from . import ledger
from .incoming import Message
from .mapping import Decision, cached_rule_set, decide, load_rule_set
from .models import USAGE_TYPES, EventStatus, MessageType

# The answer to a message naming a suppressed userId (SPEC §12): not stored.
OUTCOME_SUPPRESSED = "suppressed"
BILLING_TRAITS = ("billingUserId", "billingId")
PROFILE_TRAITS = {"name", "email", *BILLING_TRAITS}
ENGAGE_CLASSES = {"audience", "trait"}


@dataclass
class Outcome:
    message_id: str
    # mapped, unmapped, processed, pending (a held anonymous event), duplicate (a replay:
    # nothing changed) or suppressed (names a deleted user's userId: not stored)
    status: str
    reason: str = ""
    user_pk: int | None = None
    warnings: list[dict] = field(default_factory=list)


def ingest_messages(*, workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    """Apply messages in order; returns one outcome per message, in the same order.

    Consecutive messages of one kind are recorded together: usage messages (track, page,
    screen) in one transaction, profile messages (identify, group, alias) a chunk per
    transaction, each stretch of one type set-based.
    """
    outcomes: list[Outcome] = []
    run: list[Message] = []

    def flush() -> None:
        if run:
            outcomes.extend(_RECORDERS[_run_kind(run[0])](workspace=workspace, messages=run))
            run.clear()

    for message in messages:
        if run and _run_kind(run[0]) != _run_kind(message):
            flush()
        run.append(message)
    flush()
    return outcomes


def _run_kind(message: Message) -> str:
    return "usage" if message.type in USAGE_TYPES else "profile"


def ingest_usage_messages(*, workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    if len(messages) == 1 and messages[0].user_id and pipelined.available():
        # Segment's commonest message: one track of a user it has identified before.
        outcome = _record_known_user_usage(workspace, messages[0])
        if outcome is not None:
            return [outcome]
    run = _ingest_usage_pipelined if pipelined.available() else _ingest_usage_once
    # A single event's insert is a prepared statement (ledger.record_usage_events).
    return prepared.again_if_missing(lambda: run_with_retries(lambda: run(workspace, messages)))


def _record_known_user_usage(workspace: Workspace, message: Message) -> Outcome | None:
    """A single usage message of a userId that has a user, decided with the rules this
    process holds and stored in one round trip without ``BEGIN`` or ``COMMIT``
    (``ledger.record_known_user_usage``), provided they are still the workspace's rules. None
    when it stored nothing for another reason than a replay (no rules loaded yet, the rules
    moved, the userId has no user or is suppressed, a concurrent change the database
    reported): the caller then records the message the usual way, whose reads answer each of
    those, so a miss costs one round trip more and never another answer.

    Exactness is the usual path's (docs/architecture.md, "Rules and retroactive
    reprocessing"): the decision stands only if the version read after the shared rules lock
    was granted is the one it was made with, and the lock is held until the event commits.
    """
    rule_set = cached_rule_set(workspace.pk)
    if rule_set is None:
        return None
    decision = decide(rule_set, message.name, message.properties)
    if len(decision.usages) > ledger.PREPARED_MAX_USAGES:
        return None  # one prepared shape per number of usage rows: keep them few
    try:
        done = prepared.again_if_missing(
            lambda: ledger.record_known_user_usage(workspace, message, decision, rules_version=rule_set.version)
        )
    except (IntegrityError, OperationalError) as exc:
        if not is_retryable(exc):
            raise
        return None  # e.g. the user deleted after the statement's snapshot: its FK check failed
    if done.user_pk is None:
        return None
    if not done.stored:
        return Outcome(message.message_id, "duplicate")
    return Outcome(message.message_id, decision.status, decision.reason, done.user_pk)


def _ingest_usage_pipelined(workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    """``_ingest_usage_once`` with its BEGIN sent with the first statement (the rules lock,
    version and known-ids read, which also reads the userIds' users) and its COMMIT with the
    event insert (``kana.db.pipelined``): the same statements in the same order in one
    transaction, so the exactness argument of the rules lock is unchanged
    (docs/architecture.md, "Rules and retroactive reprocessing"). Three round trips fewer
    (BEGIN, the userId lookup, COMMIT) for a single message and for a batch alike."""
    with pipelined.transaction():
        return _record_usage(workspace, messages, pipelined_transaction=True)


_PENDING = Decision(EventStatus.PENDING)


@transaction.atomic
def _ingest_usage_once(workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    return _record_usage(workspace, messages)


def _record_usage(
    workspace: Workspace, messages: list[Message], *, pipelined_transaction: bool = False
) -> list[Outcome]:
    anonymous_ids = {m.anonymous_id for m in messages if not m.user_id and m.anonymous_id}
    sent_user_ids = {m.user_id for m in messages if m.user_id}
    version, known = ledger.lock_rules_and_find_replays(
        workspace,
        {m.message_id for m in messages},
        sent_user_ids,
        anonymous_ids,
        begin=pipelined_transaction,
        with_users=pipelined_transaction,
        prepare=True,  # ingest_usage_messages runs this under prepared.again_if_missing
    )
    fresh, first = _fresh_and_suppressed(messages, known.replayed, known.suppressed)
    if fresh:
        rule_set = load_rule_set(workspace.pk, version)
        # A held event whose anonymousId is linked already (it arrived after the identify)
        # is its user's event at once. The userId's user deleted meanwhile? Its links went
        # with it (delete_user), so a linked userId is not a suppressed one.
        owner = {m.message_id: m.user_id or known.linked.get(m.anonymous_id) for m in fresh.values()}
        external_ids = {user_id for user_id in owner.values() if user_id}
        # ``known.users`` answers for the userIds sent only: a linked userId (a held event's)
        # missing from it is unread, not new (an alias's userId has a user already).
        read = known.users if external_ids <= sent_user_ids else None
        user_pks = (
            user_services.resolve_users(workspace=workspace, external_ids=external_ids, known=read)
            if external_ids
            else {}
        )
        decided = [
            # A held anonymous event (no userId: the edge lets one through only for a workspace
            # that holds them) is stored pending, with no user, until an identify or alias
            # links its anonymousId.
            (_as_user(m, owner[m.message_id]), decide(rule_set, m.name, m.properties), user_pks[owner[m.message_id]])
            if owner[m.message_id]
            else (m, _PENDING, None)
            for m in fresh.values()
        ]
        stored = ledger.record_usage_events(workspace, decided, then_commit=pipelined_transaction, prepare=True)
        for m, d, pk in decided:
            if m.message_id in stored:
                first[m.message_id] = Outcome(m.message_id, d.status, d.reason, pk)
    # The first occurrence of a stored (or suppressed) messageId gets its outcome; a repeat is a duplicate.
    return [first.pop(m.message_id, None) or Outcome(m.message_id, "duplicate") for m in messages]


def _as_user(message: Message, user_id: str) -> Message:
    """The message as its user's: a held event whose anonymousId was linked is stored under
    the linked userId (``external_user_id``), as an unmerge expects."""
    return message if message.user_id == user_id else replace(message, user_id=user_id)


def _fresh_and_suppressed(
    messages: list[Message], replayed: set[str], suppressed: set[str]
) -> tuple[dict[str, Message], dict[str, Outcome]]:
    """The messages to store (not replayed, first of their messageId), and the ``suppressed``
    outcomes of those naming a suppressed userId (or previousId): answered, never stored."""
    fresh: dict[str, Message] = {}
    answered: dict[str, Outcome] = {}
    for message in messages:
        message_id = message.message_id
        if message_id in replayed or message_id in fresh or message_id in answered:
            continue
        if message.user_id in suppressed or message.previous_id in suppressed:
            answered[message_id] = Outcome(message_id, OUTCOME_SUPPRESSED)
        else:
            fresh[message_id] = message
    return fresh, answered


# --- Identify, group and alias calls ------------------------------------------------------

# Profile messages applied per transaction. An identify takes two advisory locks (userId,
# email), an alias two: a chunk stays far below PostgreSQL's lock table, and a batch of 2,500
# is a few dozen transactions of a few statements each.
PROFILE_CHUNK = 100

# What applies a chunk's fresh (not replayed) messages: returns (message, user id, warnings)
# for a prefix of them, in order (identify may stop early: see users.identity.identify_users),
# and the merges they made (absorbed user id -> survivor id).
Applied = tuple[list[tuple[Message, int, list[dict]]], dict[int, int]]
Applier = Callable[[Workspace, list[Message]], Applied]


def _record_profile_run(workspace: Workspace, messages: list[Message], apply: Applier) -> list[Outcome]:
    outcomes: list[Outcome] = []
    pending = list(messages)
    while pending:
        chunk = pending[:PROFILE_CHUNK]
        done = run_with_retries(lambda chunk=chunk: _record_profile_chunk(workspace, chunk, apply))
        outcomes.extend(done)
        pending = pending[len(done) :]
    return outcomes


@transaction.atomic
def _record_profile_chunk(workspace: Workspace, messages: list[Message], apply: Applier) -> list[Outcome]:
    """Outcomes of a prefix of ``messages`` (at least one), in one transaction: replays
    answered ``duplicate``, the rest applied and stored as processed events."""
    named = {m.user_id for m in messages if m.user_id} | {m.previous_id for m in messages if m.previous_id}
    known = ledger.known_ids(workspace, {m.message_id for m in messages}, named)
    fresh, suppressed_outcomes = _fresh_and_suppressed(messages, known.replayed, known.suppressed)
    applied, merges = apply(workspace, list(fresh.values())) if fresh else ([], {})
    if applied and connection.vendor == "postgresql":
        applied_ids = {m.user_id for m, _, _ in applied} | {m.previous_id for m, _, _ in applied if m.previous_id}
        if user_services.suppressed_user_ids(workspace=workspace, user_ids=applied_ids):
            # A user was deleted (its userIds suppressed) after the check above, and this
            # chunk may have given one of them a user again: run again, they are now answered
            # ``suppressed``. (SQLite serialises writers: the check cannot be overtaken.)
            raise ConcurrentChange()
    if merges:
        # A later message of the chunk merged away the user of an earlier one: its event
        # belongs to the survivor, as it would had it been stored before that merge.
        applied = [(m, _survivor(pk, merges), w) for m, pk, w in applied]
    if len(ledger.record_processed_events(workspace, applied)) != len(applied):
        raise ConcurrentChange()  # a concurrent request stored one of them: redo without it
    links = _anonymous_links(applied)
    if links:
        attribute_pending_events(workspace, links)
        if workspace.anonymous_events == AnonymousEvents.HOLD:
            user_services.link_anonymous_ids(workspace=workspace, links={a: u for a, (_pk, u) in links.items()})
    processed = {m.message_id: Outcome(m.message_id, EventStatus.PROCESSED, "", pk, w) for m, pk, w in applied}
    outcomes, answered = [], set()
    for message in messages:
        message_id = message.message_id
        if message_id in fresh and message_id not in processed and message_id not in answered:
            break  # not applied in this chunk: the caller sends it, and what follows, again
        answered.add(message_id)
        outcomes.append(
            processed.pop(message_id, None)
            or suppressed_outcomes.pop(message_id, None)
            or Outcome(message_id, "duplicate")
        )
    return outcomes


def _anonymous_links(applied: list[tuple[Message, int, list[dict]]]) -> dict[str, tuple[int, str]]:
    """anonymousId -> (user id, userId) for what this chunk linked: an identify carrying both
    ids, an alias whose previousId may be an anonymousId. The first link of an id wins."""
    links: dict[str, tuple[int, str]] = {}
    for message, user_pk, _warnings in applied:
        anonymous_id = message.previous_id if message.type == MessageType.ALIAS else message.anonymous_id
        if anonymous_id and message.type != MessageType.GROUP:
            links.setdefault(anonymous_id, (user_pk, message.user_id))
    return links


def attribute_pending_events(workspace: Workspace, links: dict[str, tuple[int, str]]) -> int:
    """Move the pending events of linked anonymousIds to their user and map them with the
    rules, in the caller's transaction; returns the events mapped.

    Under the shared rules lock, like ingest and reprocessing, with the same evaluator: an
    event attributed while a rule is created is either mapped here with that rule or left
    unmapped with an id the rule's reprocessing job covers (SPEC §6 exactness).
    """
    event_ids = ledger.pending_event_ids(workspace, set(links))
    if not event_ids:
        return 0
    rule_set = load_rule_set(workspace.pk, lock_rules_shared(workspace.pk))
    owners: dict[int, tuple[int, str]] = {}
    decisions: dict[int, Decision] = {}
    for event_id, anonymous_id, name, properties in ledger.lock_pending_events(workspace, event_ids):
        owners[event_id] = links[anonymous_id]
        decisions[event_id] = decide(rule_set, name, properties)
    return ledger.attribute_pending_events(workspace, owners, decisions) if owners else 0


def _survivor(user_pk: int, merges: dict[int, int]) -> int:
    while user_pk in merges:
        user_pk = merges[user_pk]
    return user_pk


def _merges(results) -> dict[int, int]:
    return {absorbed: result.user.pk for result in results for absorbed in result.absorbed_ids}


def _apply_identifies(workspace: Workspace, messages: list[Message]) -> Applied:
    identifies, warnings = [], []
    for message in messages:
        changes, message_warnings = _identify_changes(message)
        row = user_services.ProfileRow(changes=changes, user_id=message.user_id, label=f"message:{message.message_id}")
        identifies.append((row, message.occurred_at))
        warnings.append(message_warnings)
    results = user_services.identify_users(workspace=workspace, identifies=identifies)
    applied = []
    for message, message_warnings, result in zip(messages, warnings, results, strict=False):  # results: a prefix
        if result.ambiguous:
            message_warnings = [*message_warnings, _AMBIGUOUS_EMAIL_WARNING]
        applied.append((message, result.user.pk, message_warnings))
    return applied, _merges(results)


def _apply_groups(workspace: Workspace, messages: list[Message]) -> Applied:
    user_pks = user_services.resolve_users(workspace=workspace, external_ids={m.user_id for m in messages})
    calls = [user_services.GroupCall(user_pks[m.user_id], m.group_id, m.traits, m.occurred_at) for m in messages]
    user_services.record_groups(workspace=workspace, calls=calls)
    return [(m, user_pks[m.user_id], list(m.warnings)) for m in messages], {}


def _apply_aliases(workspace: Workspace, messages: list[Message]) -> Applied:
    calls = [user_services.AliasCall(m.previous_id, m.user_id, f"message:{m.message_id}") for m in messages]
    results = user_services.alias_users(workspace=workspace, calls=calls)
    return [(m, result.user.pk, list(m.warnings)) for m, result in zip(messages, results, strict=True)], _merges(
        results
    )


def _apply_profile_messages(workspace: Workspace, messages: list[Message]) -> Applied:
    """Identify, group and alias calls in order: each stretch of one type by its own applier,
    all in the chunk's transaction. Stops where an applier stopped early."""
    applied: list[tuple[Message, int, list[dict]]] = []
    merges: dict[int, int] = {}
    start = 0
    while start < len(messages):
        end = start
        while end < len(messages) and messages[end].type == messages[start].type:
            end += 1
        stretch = messages[start:end]
        done, stretch_merges = _APPLIERS[stretch[0].type](workspace, stretch)
        applied.extend(done)
        merges.update(stretch_merges)
        if len(done) < len(stretch):
            break
        start = end
    return applied, merges


def ingest_profile_messages(*, workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    """A run of identify, group and alias calls (in any mix), a chunk per transaction."""
    if len(messages) == 1 and messages[0].type == MessageType.IDENTIFY and pipelined.available():
        # Its write back is made of prepared statements (users.identity.MessageIdentify).
        return [prepared.again_if_missing(lambda: _record_identify(workspace, messages[0]))]
    return _record_profile_run(workspace, messages, _apply_profile_messages)


class _NeedsAtomic(Exception):
    """The identify links an anonymousId with events held (their row locks need
    ``atomic``): roll back, run it again in ``atomic``."""


def _record_identify(workspace: Workspace, message: Message) -> Outcome:
    """``_record_profile_chunk`` for the most common call, one identify per request (PostgreSQL,
    outside any transaction), in fewer round trips: the advisory locks, the reads of its
    users and the replay and suppression check in one (``users.services.MessageIdentify``),
    the engine's write back in one, the event. Creations, updates and claims travel with
    their ``BEGIN`` and ``COMMIT`` (``kana.db.pipelined``); a merge goes on in ``atomic``
    from its first read (``pipelined.atomic``); an anonymousId with events held runs the
    same steps again in ``atomic``.
    """
    holds = message.anonymous_id and workspace.anonymous_events == AnonymousEvents.HOLD
    if not holds:
        try:
            return run_with_retries(lambda: _record_identify_once(workspace, message, pipelined_transaction=True))
        except _NeedsAtomic:
            pass
    return run_with_retries(lambda: _record_identify_atomic(workspace, message))


@transaction.atomic
def _record_identify_atomic(workspace: Workspace, message: Message) -> Outcome:
    return _record_identify_once(workspace, message, pipelined_transaction=False)


def _record_identify_once(workspace: Workspace, message: Message, *, pipelined_transaction: bool) -> Outcome:
    changes, warnings = _identify_changes(message)
    row = user_services.ProfileRow(changes=changes, user_id=message.user_id, label=f"message:{message.message_id}")
    with pipelined.transaction() if pipelined_transaction else nullcontext():
        identify = user_services.MessageIdentify(
            workspace=workspace,
            row=row,
            # Read after the users are locked: see MessageIdentify for why a suppression
            # found here needs no second look after the write.
            read=ledger.single_known_ids_statement(workspace, message.message_id, message.user_id or None),
            begin=pipelined_transaction,
        )
        known = ledger._known_ids(identify.read_rows)
        fresh, suppressed = _fresh_and_suppressed([message], known.replayed, known.suppressed)
        if not fresh:
            return suppressed.get(message.message_id) or Outcome(message.message_id, "duplicate")
        if pipelined_transaction and identify.merges():
            # A merge's receivers may enqueue work on commit, which only atomic defers: the
            # transaction open here (its locks and reads done) becomes Django's.
            with pipelined.atomic():
                return _apply_identify(workspace, message, identify, warnings, pipelined_transaction=False)
        return _apply_identify(workspace, message, identify, warnings, pipelined_transaction=pipelined_transaction)


def _apply_identify(
    workspace: Workspace,
    message: Message,
    identify: user_services.MessageIdentify,
    warnings: list[dict],
    *,
    pipelined_transaction: bool,
) -> Outcome:
    """The rest of ``_record_identify_once``, once the message is known to be fresh: the
    engine's write back, the event, the anonymousId's held events."""
    result = identify.apply(occurred_at=message.occurred_at)
    if result.ambiguous:
        warnings = [*warnings, _AMBIGUOUS_EMAIL_WARNING]
    applied = [(message, result.user.pk, warnings)]
    links = _anonymous_links(applied)
    # Nothing after the event but the COMMIT (no anonymousId to look at): it travels with it.
    then_commit = pipelined_transaction and not links
    if not ledger.record_processed_events(workspace, applied, then_commit=then_commit, prepare=True):
        raise ConcurrentChange()  # a concurrent request stored it: redo, it is a replay
    if links and pipelined_transaction:
        # Not a holding workspace (above): events are held under an anonymousId only
        # when it held them before a switch. Rare; they need row locks.
        if ledger.pending_event_ids(workspace, set(links)):
            raise _NeedsAtomic()
    elif links:
        attribute_pending_events(workspace, links)
        if workspace.anonymous_events == AnonymousEvents.HOLD:
            user_services.link_anonymous_ids(workspace=workspace, links={a: u for a, (_pk, u) in links.items()})
    return Outcome(message.message_id, EventStatus.PROCESSED, "", result.user.pk, warnings)


_APPLIERS = {
    MessageType.IDENTIFY: _apply_identifies,
    MessageType.GROUP: _apply_groups,
    MessageType.ALIAS: _apply_aliases,
}
_RECORDERS = {"usage": ingest_usage_messages, "profile": ingest_profile_messages}


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
