"""Deciding which features an event counts for, from a per-process cache of the rules."""

import logging
import threading
from dataclasses import dataclass, field
from decimal import Decimal

from features.models import EventStatus, UnmappedReason

from .models import Feature, MappingRule
from .rules import AmountError, CompiledRule, read_default_amount

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuleSet:
    """A workspace's features and active rules at one ``rules_version``."""

    version: int
    feature_ids: dict[str, int]
    rules: tuple[CompiledRule, ...]
    # featureIds of archived features: events naming them are unmapped, with that reason.
    archived_keys: frozenset[str] = frozenset()
    # Event name -> the rules that can match it (those naming it or no name), in ``rules``'
    # order; ``_any_name`` for the names no rule names. Built once per rule set, so an event
    # is matched against its candidates only, not against every rule of the workspace.
    _by_name: dict[str, tuple[CompiledRule, ...]] = field(init=False, repr=False, compare=False)
    _any_name: tuple[CompiledRule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = {rule.event_name for rule in self.rules if rule.event_name is not None}
        by_name = {name: tuple(r for r in self.rules if r.event_name in (None, name)) for name in names}
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_any_name", tuple(r for r in self.rules if r.event_name is None))

    def rules_for(self, event_name: str) -> tuple[CompiledRule, ...]:
        """The rules that can match an event of this name, oldest first."""
        return self._by_name.get(event_name, self._any_name)


@dataclass
class Decision:
    status: str
    reason: str = ""
    # (feature_id, amount, rule_id or None): at most one entry per feature.
    usages: list[tuple[int, Decimal, int | None]] = field(default_factory=list)


_cache: dict[int, RuleSet] = {}
_cache_lock = threading.Lock()


def load_rule_set(workspace_id: int, version: int) -> RuleSet:
    """The workspace's rules at ``version``: cached, reloaded (2 queries) when it moves.

    Call it with the version read under the rules lock, in the same transaction, so the
    rules loaded are the ones committed at that version.
    """
    cached = _cache.get(workspace_id)
    if cached is not None and cached.version == version:
        return cached
    features = Feature.objects.for_workspace(workspace_id).values_list("key", "id", "archived_at")
    feature_ids, archived = {}, set()
    for key, feature_id, archived_at in features:
        if archived_at is None:
            feature_ids[key] = feature_id
        else:
            archived.add(key)
    archived_keys = frozenset(archived)
    rules = tuple(
        CompiledRule(
            rule_id=r.pk,
            feature_id=r.feature_id,
            event_name=r.event_name,
            conditions=tuple(r.conditions or ()),
            amount_property=r.amount_property,
        )
        for r in MappingRule.objects.for_workspace(workspace_id)
        .filter(active=True, feature__archived_at__isnull=True)
        .order_by("pk")
    )
    rule_set = RuleSet(version=version, feature_ids=feature_ids, rules=rules, archived_keys=archived_keys)
    with _cache_lock:
        _cache[workspace_id] = rule_set
    return rule_set


def cached_rule_set(workspace_id: int) -> RuleSet | None:
    """The workspace's rules this process loaded last, at whatever version they were then (a
    caller that uses them must check that version, under the rules lock, as
    ``ledger.record_known_user_usage`` does); None when none are loaded yet."""
    return _cache.get(workspace_id)


def decide(rule_set: RuleSet, event_name: str, properties: dict) -> Decision:
    """Which features one event counts for, and how much; or why it maps to none.

    ``featureId`` maps straight to that feature and rules are not consulted. Otherwise every
    matching active rule counts (the oldest rule wins when two name the same feature). An
    invalid amount leaves the whole event unmapped, so it is never partly counted.

    Never raises: ingest and reprocessing both call it, and one event that cannot be decided
    must neither fail a request (and the batch with it) nor stop a reprocessing job for good.
    Such an event is left unmapped with reason ``invalid_value``.
    """
    try:
        return _decide(rule_set, event_name, properties)
    except AmountError as exc:
        return Decision(EventStatus.UNMAPPED, exc.reason)
    except Exception as exc:  # see the docstring: whatever the evaluator raises concerns this event only
        logger.warning("event could not be decided", extra={"event": event_name, "error": type(exc).__name__})
        return Decision(EventStatus.UNMAPPED, UnmappedReason.INVALID_VALUE)


def _decide(rule_set: RuleSet, event_name: str, properties: dict) -> Decision:
    feature_key = properties.get("featureId")
    if feature_key is not None and feature_key != "":
        feature_id = rule_set.feature_ids.get(str(feature_key))
        if feature_id is None:
            if str(feature_key) in rule_set.archived_keys:
                return Decision(EventStatus.UNMAPPED, UnmappedReason.FEATURE_ARCHIVED)
            return Decision(EventStatus.UNMAPPED, UnmappedReason.UNKNOWN_FEATURE)
        return Decision(EventStatus.MAPPED, usages=[(feature_id, read_default_amount(properties), None)])

    usages: dict[int, tuple[int, Decimal, int | None]] = {}
    for rule in rule_set.rules_for(event_name):
        if rule.feature_id in usages or not rule.matches(event_name, properties):
            continue
        usages[rule.feature_id] = (rule.feature_id, rule.read_amount(properties), rule.rule_id)
    if not usages:
        return Decision(EventStatus.UNMAPPED, UnmappedReason.NO_MATCHING_RULE)
    return Decision(EventStatus.MAPPED, usages=list(usages.values()))
