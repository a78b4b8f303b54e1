"""Dashboard forms: they validate what a person typed and hand it to the services."""

import json
import re

from django import forms
from django.forms import formset_factory

from entitlements.models import ResetPeriod, SubscriptionStatus
from entitlements.services import PackageFeatureSpec
from features.models import Feature, FeatureType
from features.rules import OPERATORS
from kana.models import ANONYMOUS_HOLD_DAYS_MAX, ANONYMOUS_HOLD_DAYS_MIN, AnonymousEvents

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


class WorkspaceSettingsForm(forms.Form):
    name = forms.CharField(max_length=200, label="Workspace name")
    anonymous_events = forms.ChoiceField(
        label="Events with only an anonymousId",
        choices=[
            (AnonymousEvents.REJECT, "Reject them (400 anonymous_event)"),
            (AnonymousEvents.HOLD, "Hold them until an identify or alias names their anonymousId"),
        ],
    )
    anonymous_hold_days = forms.IntegerField(
        label="Hold pending events for (days)",
        min_value=ANONYMOUS_HOLD_DAYS_MIN,
        max_value=ANONYMOUS_HOLD_DAYS_MAX,
        help_text="Pending events older than this expire: they are counted, never mapped.",
    )


class FeatureForm(forms.Form):
    key = forms.CharField(max_length=100, label="Feature id", help_text="What events send as properties.featureId")
    name = forms.CharField(max_length=255, required=False)
    type = forms.ChoiceField(choices=FeatureType.choices, initial=FeatureType.CONSUMABLE)


COMPARISONS = ("gt", "gte", "lt", "lte")


def operator_text(operator: str) -> str:
    """How the builder shows an operator in a sentence: ``“>”``, ``“is one of”``."""
    return f"“{OPERATOR_LABELS.get(operator, operator)}”"


_API_OPERATOR = re.compile(r"'(" + "|".join(OPERATORS) + r")'")
_API_FIELD = re.compile(r"^conditions\[\d+\]\.?(\w+)?\s*")


def in_dashboard_words(message: str) -> str:
    """A rules-service message as the builder's words: its operator symbols and words rather
    than the API's codes (``'gt'`` -> ``“>”``), and no ``conditions[0].value`` prefix (the
    message is shown on the row it is about)."""
    message = _API_OPERATOR.sub(lambda m: operator_text(m.group(1)), message)
    match = _API_FIELD.match(message)
    if match:
        message = f"the {match.group(1)} {message[match.end() :]}" if match.group(1) else message[match.end() :]
    return message[:1].upper() + message[1:]


class ConditionForm(forms.Form):
    # Placeholders start with "e.g." and are styled as hints: they must not pass for values.
    property = forms.CharField(
        max_length=255,
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "e.g. plan.tier", "aria-label": "Property"}),
    )
    operator = forms.ChoiceField(
        choices=[(op, OPERATOR_LABELS[op]) for op in OPERATORS],
        initial="equals",
        widget=forms.Select(attrs={"aria-label": "Operator"}),
    )
    value = forms.CharField(
        max_length=1000,
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "e.g. pro", "aria-label": "Value"}),
    )

    def clean(self):
        """What the rules service would refuse, said with the operator the admin picked."""
        data = super().clean()
        path = (data.get("property") or "").strip()
        operator, raw = data.get("operator"), (data.get("value") or "").strip()
        if not path:
            if raw:
                raise forms.ValidationError("Type the property this value is for, such as plan.tier.")
            return data
        value = parse_value(raw)
        if operator in COMPARISONS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise forms.ValidationError(f"{operator_text(operator)} compares numbers: type one, such as 3.")
        if operator == "in" and not raw:
            raise forms.ValidationError(f"{operator_text(operator)} needs a comma-separated list, such as pro, team.")
        if operator in ("equals", "not_equals", "contains") and not raw:
            raise forms.ValidationError(f"{operator_text(operator)} needs a value.")
        if operator == "exists" and value not in (None, True, False):
            raise forms.ValidationError(f"{operator_text(operator)} takes no value (or true / false).")
        return data

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


MAX_CONDITIONS = 20
ConditionFormSet = formset_factory(ConditionForm, extra=0, max_num=MAX_CONDITIONS)
NEW_FEATURE = "__new__"  # the feature choice that creates one with the rule


class RuleForm(forms.Form):
    name = forms.CharField(max_length=255)
    event_name = forms.CharField(
        max_length=255, required=False, label="Event name", help_text="Leave empty to match any event"
    )
    feature = forms.ChoiceField(label="Records usage of", required=False)
    amount_property = forms.CharField(
        max_length=255, required=False, label="Amount property", help_text="Default: properties.delta, else 1"
    )
    # A feature created with the rule, when it does not exist yet.
    new_feature_key = forms.CharField(
        max_length=100,
        required=False,
        label="New feature id",
        help_text="What events send as properties.featureId",
        widget=forms.TextInput(attrs={"placeholder": "e.g. pdf-exports"}),
    )
    new_feature_name = forms.CharField(
        max_length=255, required=False, label="Name", widget=forms.TextInput(attrs={"placeholder": "e.g. PDF exports"})
    )
    new_feature_type = forms.ChoiceField(
        choices=FeatureType.choices, initial=FeatureType.CONSUMABLE, required=False, label="Type"
    )

    def __init__(self, *args, workspace, **kwargs):
        super().__init__(*args, **kwargs)
        features = Feature.objects.for_workspace(workspace).order_by("key").values_list("key", "name")
        self.fields["feature"].choices = (
            [("", "— choose a feature —")]
            + [(key, f"{name} ({key})" if name and name != key else key) for key, name in features]
            + [(NEW_FEATURE, "+ Create a new feature…")]
        )

    def clean(self):
        data = super().clean()
        feature, new_key = data.get("feature"), (data.get("new_feature_key") or "").strip()
        data["new_feature_type"] = data.get("new_feature_type") or FeatureType.CONSUMABLE
        if feature == "" and new_key:
            data["feature"] = feature = NEW_FEATURE  # typed a new feature without picking the option
        if feature == NEW_FEATURE and not new_key:
            self.add_error("new_feature_key", "Type the id of the feature to create.")
        elif not feature and "feature" not in self.errors:
            self.add_error("feature", "Choose the feature this rule records usage of, or create one.")
        return data

    @property
    def creates_feature(self) -> bool:
        return self.cleaned_data.get("feature") == NEW_FEATURE


class CsvUploadForm(forms.Form):
    file = forms.FileField(label="CSV file")


# --- Packages and subscriptions (entitlements) ---------------------------------------------


def _metadata_field() -> forms.CharField:
    return forms.CharField(
        required=False,
        label="Metadata (JSON)",
        help_text='An object, such as {"stripe_price": "price_123"}; empty for none',
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": 'e.g. {"stripe_price": "price_123"}'}),
    )


def _clean_metadata(text: str) -> dict:
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise forms.ValidationError('Metadata is JSON: an object such as {"tier": "pro"}.') from None
    if not isinstance(value, dict):
        raise forms.ValidationError('Metadata is a JSON object, in braces: {"tier": "pro"}.')
    return value


class PublishedPackageForm(forms.Form):
    """What any package may change: a published or archived one, only this."""

    name = forms.CharField(max_length=255, required=False)
    metadata = _metadata_field()

    def clean_metadata(self):
        return _clean_metadata(self.cleaned_data.get("metadata"))


class PackageForm(PublishedPackageForm):
    """A new or draft package's own fields (its feature rows are ``PackageFeatureFormSet``)."""

    key = forms.CharField(max_length=100, label="Package id", help_text="What the API calls it, such as pro-plan")
    is_addon = forms.TypedChoiceField(
        label="Kind",
        choices=[("false", "Base package"), ("true", "Add-on")],
        coerce=lambda value: value == "true",
        initial="false",
    )


class PackageFeatureForm(forms.Form):
    """One feature row; a row without a feature is blank and ignored."""

    feature = forms.ChoiceField(required=False, widget=forms.Select(attrs={"aria-label": "Feature"}))
    limit = forms.DecimalField(
        required=False,
        max_digits=30,
        decimal_places=9,
        widget=forms.TextInput(attrs={"placeholder": "unlimited", "aria-label": "Limit", "inputmode": "decimal"}),
    )
    overage_enabled = forms.BooleanField(required=False, label="Overage")
    reset_period = forms.ChoiceField(
        choices=ResetPeriod.choices, initial=ResetPeriod.MONTH, widget=forms.Select(attrs={"aria-label": "Resets"})
    )

    def __init__(self, *args, feature_choices=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["feature"].choices = [("", "— no feature —"), *feature_choices]

    def spec(self) -> PackageFeatureSpec | None:
        key = self.cleaned_data.get("feature")
        if not key:
            return None
        return PackageFeatureSpec(
            feature_key=key,
            limit=self.cleaned_data.get("limit"),
            overage_enabled=bool(self.cleaned_data.get("overage_enabled")),
            reset_period=self.cleaned_data.get("reset_period") or ResetPeriod.MONTH,
        )


# A package names few features; blank rows (no JavaScript needed) leave room for new ones.
MAX_PACKAGE_FEATURES = 50
BLANK_FEATURE_ROWS = 3
PackageFeatureFormSet = formset_factory(PackageFeatureForm, extra=0, max_num=MAX_PACKAGE_FEATURES)


def feature_choices(workspace) -> list[tuple[str, str]]:
    features = Feature.objects.for_workspace(workspace).order_by("key").values_list("key", "name", "type")
    return [
        (key, f"{name or key} ({key}, {kind})" if name and name != key else f"{key} ({kind})")
        for key, name, kind in features
    ]


def package_feature_formset(workspace, data=None, rows=()) -> PackageFeatureFormSet:
    """The feature rows: ``rows`` (initial values) plus blank rows, or what was posted."""
    kwargs = {"form_kwargs": {"feature_choices": feature_choices(workspace)}, "prefix": "features"}
    if data is not None:
        return PackageFeatureFormSet(data, **kwargs)
    return PackageFeatureFormSet(initial=[*rows, *([{}] * BLANK_FEATURE_ROWS)], **kwargs)


class SubscribeForm(forms.Form):
    package = forms.ChoiceField(label="Package")
    status = forms.ChoiceField(choices=SubscriptionStatus.choices, initial=SubscriptionStatus.ACTIVE)
    started_at = forms.DateTimeField(
        label="Starts (UTC)",
        required=False,
        help_text="The period anchor; empty: now",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"],
    )

    def __init__(self, *args, packages=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["package"].choices = [("", "— choose a package —"), *package_choices(packages)]


def package_choices(packages) -> list[tuple[str, str]]:
    return [
        (str(p.pk), f"{p.name or p.key} ({p.key}{', add-on' if p.is_addon else ''})" if p.name != p.key else p.key)
        for p in packages
    ]


class SubscriptionChangeForm(forms.Form):
    package = forms.ChoiceField(label="Plan", required=False)
    status = forms.ChoiceField(choices=SubscriptionStatus.choices, required=False)

    def __init__(self, *args, packages=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["package"].choices = package_choices(packages)
