"""Features and mapping rules: creating them, changing them, and starting reprocessing.

Creating a rule or a feature takes the workspace's rules lock exclusively (see
``kana.locks.lock_rules_shared``): in-flight ingest transactions finish first, so every
event is either already committed (and the job below will scan it) or arrives after the
rule is committed (and ingest maps it with the rule). Nothing is counted zero times or twice.
"""

import logging
import re

from django.db import transaction
from django.db.models import F, Max, ProtectedError
from django.utils import timezone

from features.models import Event
from kana import audit, jobs
from kana.jobs import JobStatus
from kana.locks import lock_rules_exclusive
from kana.models import Workspace

from . import reprocessing
from .definitions import RuleDefinition, clean_rule_definition
from .errors import FeatureError
from .models import Feature, FeatureType, MappingRule, ReprocessingJob, Usage

logger = logging.getLogger(__name__)

_FEATURE_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


# The Celery task that runs a ReprocessingJob (features/tasks.py), by name.
REPROCESSING_TASK = "features.tasks.run_reprocessing_job"


def _bump_rules_version(workspace: Workspace) -> None:
    Workspace.objects.filter(pk=workspace.pk).update(rules_version=F("rules_version") + 1)


def _feature_summary(feature: Feature) -> dict:
    return {
        "key": feature.key,
        "name": feature.name,
        "type": feature.type,
        "archived": feature.archived_at is not None,
        "unit_label": feature.unit_label,
        "unit_label_plural": feature.unit_label_plural,
        "metadata": feature.metadata,
    }


def _rule_summary(rule: MappingRule) -> dict:
    return {
        "name": rule.name,
        "feature": rule.feature.key,
        "event_name": rule.event_name,
        "conditions": rule.conditions,
        "amount_property": rule.amount_property,
        "active": rule.active,
    }


def _start_job(
    *, workspace: Workspace, rule: MappingRule | None = None, feature: Feature | None = None
) -> ReprocessingJob:
    """Create a job covering every event committed so far and enqueue it after commit: in
    parts when it is large (``reprocessing.job_parts``); returns the first.

    Must be called under the exclusive rules lock: events after ``last_event_id`` are
    ingested with the new rule or feature already visible.
    """
    last_event_id = Event.objects.for_workspace(workspace).aggregate(last=Max("id"))["last"] or 0
    start, parts = reprocessing.job_parts(
        workspace.pk, last_event_id, rule=rule, feature_id=feature.pk if feature is not None else None
    )
    # The parts of a split job start with an empty slice at the start: each claims its first
    # chunk of candidates with its first chunk (reprocessing._claim_next_slice).
    slice_end = start if parts > 1 else None
    first = None
    for _part in range(parts):
        part = ReprocessingJob.objects.create(
            workspace=workspace,
            rule=rule,
            feature=feature,
            cursor=start,
            last_event_id=last_event_id,
            slice_end=slice_end,
            part_of=first,
        )
        first = first or part
        jobs.enqueue_on_commit(REPROCESSING_TASK, part.pk)
    return first


def feature_create(
    *,
    workspace: Workspace,
    key: str,
    name: str = "",
    type: str = FeatureType.CONSUMABLE,
    unit_label: str = "",
    unit_label_plural: str = "",
    metadata: dict | None = None,
    actor: str = "",
) -> Feature:
    """Create a feature. Events that named it as featureId before it existed get mapped."""
    key = (key or "").strip()
    if not _FEATURE_KEY.match(key):
        raise FeatureError("invalid_feature_id", "a feature id is 1-100 letters, digits, _ . : -", "id")
    if type not in FeatureType.values:
        raise FeatureError("invalid_feature_type", "type must be BINARY or CONSUMABLE", "type")
    with transaction.atomic():
        lock_rules_exclusive(workspace.pk)
        if Feature.objects.for_workspace(workspace).filter(key=key).exists():
            raise FeatureError("feature_exists", f"a feature with id {key!r} already exists", "id", status=409)
        feature = Feature.objects.create(
            workspace=workspace,
            key=key,
            name=name or key,
            type=type,
            unit_label=unit_label,
            unit_label_plural=unit_label_plural,
            metadata=metadata or {},
        )
        _bump_rules_version(workspace)
        _start_job(workspace=workspace, feature=feature)
        audit.record(workspace, actor, "feature.create", feature.key, after=_feature_summary(feature))
    return feature


def feature_update(
    *,
    workspace: Workspace,
    feature: Feature,
    name: str | None = None,
    type: str | None = None,
    archived: bool | None = None,
    unit_label: str | None = None,
    unit_label_plural: str | None = None,
    metadata: dict | None = None,
    actor: str = "",
) -> Feature:
    """Rename, retype, relabel, archive (no new usage, history kept) or unarchive a feature."""
    if type is not None and type not in FeatureType.values:
        raise FeatureError("invalid_feature_type", "type must be BINARY or CONSUMABLE", "type")
    with transaction.atomic():
        if archived is not None:
            # What ingest maps to changes: ordered against in-flight ingest like a new rule.
            lock_rules_exclusive(workspace.pk)
        feature = Feature.objects.for_workspace(workspace).select_for_update().get(pk=feature.pk)
        before = _feature_summary(feature)
        if name is not None:
            feature.name = name
        if type is not None:
            feature.type = type
        for field, value in (
            ("unit_label", unit_label),
            ("unit_label_plural", unit_label_plural),
            ("metadata", metadata),
        ):
            if value is not None:
                setattr(feature, field, value)
        if archived is not None and archived != (feature.archived_at is not None):
            feature.archived_at = timezone.now() if archived else None
            _bump_rules_version(workspace)
        feature.save(update_fields=["name", "type", "archived_at", "unit_label", "unit_label_plural", "metadata"])
        audit.record(workspace, actor, "feature.update", feature.key, before=before, after=_feature_summary(feature))
    return feature


def feature_delete(*, workspace: Workspace, feature: Feature, actor: str = "") -> None:
    """Delete a feature that nothing uses. One with rules or recorded usage is refused (409
    ``feature_in_use``): deleting it would delete usage; archive it instead."""
    with transaction.atomic():
        # Checked under the lock: a rule or a reprocessing job cannot add usage meanwhile.
        lock_rules_exclusive(workspace.pk)
        if MappingRule.objects.for_workspace(workspace).filter(feature=feature).exists():
            raise FeatureError("feature_in_use", "delete or re-point the rules of this feature first", "id", status=409)
        if Usage.objects.for_workspace(workspace).filter(feature=feature).exists():
            raise FeatureError(
                "feature_in_use", "this feature has recorded usage: archive it instead of deleting it", "id", status=409
            )
        try:
            with transaction.atomic():
                Feature.objects.for_workspace(workspace).filter(pk=feature.pk).delete()
        except ProtectedError as exc:  # a layer above holds on to it (a package, a reservation)
            raise FeatureError(
                "feature_in_use", "a package or a reservation includes this feature: archive it instead", "id", 409
            ) from exc
        _bump_rules_version(workspace)
        audit.record(workspace, actor, "feature.delete", feature.key, before=_feature_summary(feature))


def rule_create(*, workspace: Workspace, definition: RuleDefinition, actor: str = "") -> MappingRule:
    """Create a rule and reprocess the workspace's stored unmapped events against it."""
    feature, conditions = clean_rule_definition(workspace, definition)
    event_name = (definition.event_name or "").strip() or None
    amount_property = (definition.amount_property or "").strip() or None
    with transaction.atomic():
        lock_rules_exclusive(workspace.pk)
        rule = MappingRule.objects.create(
            workspace=workspace,
            name=definition.name.strip(),
            feature=feature,
            event_name=event_name,
            conditions=conditions,
            amount_property=amount_property,
            active=definition.active,
        )
        _bump_rules_version(workspace)
        if rule.active:
            _start_job(workspace=workspace, rule=rule)
        audit.record(workspace, actor, "rule.create", rule.pk, after=_rule_summary(rule))
    return rule


def rule_is_used(rule: MappingRule) -> bool:
    return Usage.objects.filter(rule=rule).exists()


def rule_update(
    *,
    workspace: Workspace,
    rule: MappingRule,
    name: str | None = None,
    active: bool | None = None,
    definition: RuleDefinition | None = None,
    actor: str = "",
) -> MappingRule:
    """Rename, (de)activate, or, while it has mapped nothing, redefine a rule.

    A rule that has mapped events is immutable but for name and active flag, so that the
    usage it recorded keeps meaning what it meant. Re-activating reprocesses the events
    that arrived while it was off.
    """
    with transaction.atomic():
        lock_rules_exclusive(workspace.pk)
        rule = MappingRule.objects.for_workspace(workspace).select_for_update().get(pk=rule.pk)
        before = _rule_summary(rule)
        reactivated = active is True and not rule.active
        redefined = False
        if definition is not None:
            if rule_is_used(rule):
                raise FeatureError(
                    "rule_in_use",
                    "this rule has mapped events: only its name and active flag can change",
                    "conditions",
                    status=409,
                )
            feature, conditions = clean_rule_definition(workspace, definition)
            rule.feature, rule.conditions = feature, conditions
            rule.event_name = (definition.event_name or "").strip() or None
            rule.amount_property = (definition.amount_property or "").strip() or None
            redefined = True
        if name is not None:
            if not name.strip():
                raise FeatureError("invalid_rule", "a rule needs a name", "name")
            rule.name = name.strip()
        if active is not None:
            rule.active = active
        rule.save()
        _bump_rules_version(workspace)
        if rule.active and (reactivated or redefined):
            _start_job(workspace=workspace, rule=rule)
        audit.record(workspace, actor, "rule.update", rule.pk, before=before, after=_rule_summary(rule))
    return rule


def rule_delete(*, workspace: Workspace, rule: MappingRule, actor: str = "") -> None:
    with transaction.atomic():
        # Checked under the lock, as in rule_update: a job cannot map with it meanwhile.
        lock_rules_exclusive(workspace.pk)
        if rule_is_used(rule):
            raise FeatureError("rule_in_use", "this rule has mapped events: deactivate it instead", "id", status=409)
        before = _rule_summary(rule)
        MappingRule.objects.for_workspace(workspace).filter(pk=rule.pk).delete()
        _bump_rules_version(workspace)
        audit.record(workspace, actor, "rule.delete", rule.pk, before=before)


__all__ = [
    "FeatureError",
    "RuleDefinition",
    "feature_create",
    "feature_update",
    "feature_delete",
    "rule_create",
    "rule_update",
    "rule_delete",
    "rule_is_used",
    "JobStatus",
]
