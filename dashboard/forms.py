"""Dashboard forms: they validate what a person typed and hand it to the services."""

import json

from django import forms
from django.forms import formset_factory

from features.models import Feature, FeatureType
from features.rules import OPERATORS

OPERATOR_LABELS = {
    "equals": "equals",
    "not_equals": "does not equal",
    "in": "is one of",
    "contains": "contains",
    "exists": "exists",
    "gt": ">",
    "gte": "≥",
    "lt": "<",
    "lte": "≤",
}


def parse_value(text: str):
    """A condition value as typed: numbers, true/false are matched as such, anything else
    (or a quoted "42") as text. Blank is "no value" (what ``exists`` takes)."""
    text = text.strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (str, int, float, bool, list)) else text


def format_value(value) -> str:
    """The inverse of ``parse_value``, to prefill the builder from a value seen in events."""
    if value is None:
        return ""
    if isinstance(value, str):
        return json.dumps(value) if parse_value(value) != value else value
    return json.dumps(value)


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, label="Key name")


class FeatureForm(forms.Form):
    key = forms.CharField(max_length=100, label="Feature id", help_text="What events send as properties.featureId")
    name = forms.CharField(max_length=255, required=False)
    type = forms.ChoiceField(choices=FeatureType.choices, initial=FeatureType.CONSUMABLE)


class ConditionForm(forms.Form):
    property = forms.CharField(
        max_length=255, required=False, widget=forms.TextInput(attrs={"placeholder": "plan.tier"})
    )
    operator = forms.ChoiceField(choices=[(op, OPERATOR_LABELS[op]) for op in OPERATORS], initial="equals")
    value = forms.CharField(max_length=1000, required=False, widget=forms.TextInput(attrs={"placeholder": "pro"}))

    def condition(self) -> dict | None:
        """The condition as the rules service takes it, or None for a blank row."""
        path = (self.cleaned_data.get("property") or "").strip()
        if not path:
            return None
        operator = self.cleaned_data["operator"]
        raw = self.cleaned_data.get("value") or ""
        if operator == "in":
            value = parse_value(raw)
            if not isinstance(value, list):
                value = [parse_value(part) for part in raw.split(",") if part.strip()]
        else:
            value = parse_value(raw)
        condition = {"property": path, "operator": operator}
        if value is not None:
            condition["value"] = value
        return condition


ConditionFormSet = formset_factory(ConditionForm, extra=0, max_num=20)
CONDITION_ROWS = 4


class RuleForm(forms.Form):
    name = forms.CharField(max_length=255)
    event_name = forms.CharField(
        max_length=255, required=False, label="Event name", help_text="Leave empty to match any event"
    )
    feature = forms.ChoiceField(label="Records usage of")
    amount_property = forms.CharField(
        max_length=255, required=False, label="Amount property", help_text="Default: properties.delta, else 1"
    )

    def __init__(self, *args, workspace, **kwargs):
        super().__init__(*args, **kwargs)
        features = Feature.objects.for_workspace(workspace).order_by("key").values_list("key", "name")
        self.fields["feature"].choices = [("", "— choose a feature —")] + [
            (key, f"{name} ({key})" if name and name != key else key) for key, name in features
        ]


class CsvUploadForm(forms.Form):
    file = forms.FileField(label="CSV file")
