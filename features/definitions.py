"""A mapping rule as an admin defines it, checked as the services will save it.

Below both ``features.services`` (which saves rules) and ``features.preview`` (which shows
what a rule would map before it is saved), so that the preview checks a definition exactly
as creating it would, without importing the services (which import reprocessing, which
imports the preview's SQL compiler).
"""

from dataclasses import dataclass

from kana.models import Workspace

from .errors import FeatureError
from .models import Feature
from .rules import InvalidRule, clean_conditions


@dataclass
class RuleDefinition:
    name: str
    feature_key: str
    event_name: str | None = None
    conditions: list | None = None
    amount_property: str | None = None
    active: bool = True


def clean_rule_definition(workspace: Workspace, definition: RuleDefinition) -> tuple[Feature, list[dict]]:
    """The rule's feature and cleaned conditions, as ``rule_create`` saves them; raises
    FeatureError for a definition the services refuse."""
    if not (definition.name or "").strip():
        raise FeatureError("invalid_rule", "a rule needs a name", "name")
    feature = Feature.objects.for_workspace(workspace).filter(key=definition.feature_key).first()
    if feature is None:
        raise FeatureError("unknown_feature", f"no feature with id {definition.feature_key!r}", "feature", status=404)
    try:
        conditions = clean_conditions(definition.conditions)
    except InvalidRule as exc:
        raise FeatureError("invalid_rule", exc.message, exc.field) from None
    # A blank event name is no event name ("" or " " used to pass and make a rule match everything).
    if not (definition.event_name or "").strip() and not conditions:
        raise FeatureError("invalid_rule", "a rule needs an event name or at least one condition", "conditions")
    return feature, conditions
