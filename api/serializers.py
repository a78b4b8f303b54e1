"""JSON shapes of the REST API (SPEC §9): models out, validated service arguments in.

Serializers only translate. Rules about the data (valid emails, billing ids, feature ids,
rule conditions) live in the services, which report them as ``{"code", "message", "field"}``.
"""

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from features.models import EventStatus, FeatureType
from features.rules import OPERATORS
from features.selectors import reprocessing_of
from kana.models import ANONYMOUS_HOLD_DAYS_MAX, ANONYMOUS_HOLD_DAYS_MIN, AnonymousEvents
from kana.openapi import JSON_VALUE_REF, NOT_BLANK_TEXT_PATTERN, TEXT_PATTERN, padded
from users.models import MergeReason, UserFlag
from users.profile import CHOOSABLE_FIELDS, FIELD_CHOICES
from users.selectors import flags_of, user_ids_of
from users.services import DELETE_EVENTS_CHOICES
from webhooks.models import DeliveryStatus, WebhookEventType
from webhooks.services import DEFAULT_PREVIOUS_SECRET_SECONDS, MAX_PREVIOUS_SECRET_SECONDS

from .ids import MAX_ID

# What the services accept (features.services, users.profile); the schema states it so that
# clients and schemathesis know it. tests/test_api_schema.py checks them against the services.
FEATURE_ID = r"[A-Za-z0-9_.:-]{1,100}"
FEATURE_ID_PATTERN = padded(FEATURE_ID)
EMAIL_PATTERN = padded(
    r"[A-Za-z0-9_+-]+(\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,63}",
    optional=True,
)
# A number written as text, as Python's float() reads it (finite values only).
NUMBER_TEXT_PATTERN = padded(r"[+-]?(\d(_?\d)*(\.(\d(_?\d)*)?)?|\.\d(_?\d)*)([eE][+-]?\d(_?\d)*)?")
BILLING_ID_PATTERN = padded(r"cus_[A-Za-z0-9]{1,46}|[A-Za-z0-9_.@-]{1,50}", optional=True)

# --- Request fields that take only the JSON type the schema documents ----------------------
# DRF's fields coerce: CharField turns 0 into "0", IntegerField "12" into 12, BooleanField 1
# or "yes" into True. The schema says string, integer, boolean; a request body that sends
# another type violates it and is refused (400), as schemathesis expects.


class StrictCharField(serializers.CharField):
    def __init__(self, *, schema_pattern: str | None = None, **kwargs):
        # The pattern the schema states for a request's value, when the service checks more
        # than DRF does (a feature id, an email); see api.schema.KanaAutoSchema.
        self.schema_pattern = schema_pattern
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        # The length as sent, as the schema's maxLength counts it (DRF counts it trimmed).
        if self.max_length is not None and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


def optional_text(**kwargs) -> StrictCharField:
    """A text field that may be left out, and that ``null`` or ``""`` clears."""
    return StrictCharField(required=False, allow_null=True, allow_blank=True, **kwargs)


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data):
        # JSON Schema's integer is a number without a fraction: 12.0 is one, "12" and true are not.
        if isinstance(data, float) and data.is_integer():
            data = int(data)
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictNumberField(serializers.FloatField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field({"type": "number", "exclusiveMinimum": 0, "maximum": 1})
class BudgetFractionField(StrictNumberField):
    """A fraction of a budget: 0 < t <= 1 (a threshold at 0 would fire on the first unit of nothing)."""


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


# --- Users ------------------------------------------------------------------------------


class UserSerializer(serializers.Serializer):
    """A user. Expects users from ``user_list`` (flags annotated, identities prefetched)."""

    id = serializers.IntegerField(read_only=True, help_text="Kana's id of the user.")
    user_id = serializers.CharField(allow_null=True, help_text="The canonical Segment userId (null: a bare user).")
    user_ids = serializers.SerializerMethodField()
    name = serializers.CharField()
    email = serializers.CharField()
    billing_id = serializers.CharField()
    billing_provider = serializers.CharField(help_text='"stripe", "chargebee" or "".')
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    flags = serializers.SerializerMethodField()
    audiences = serializers.SerializerMethodField()

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_user_ids(self, user) -> list[str]:
        """Every userId resolving to the user, canonical first."""
        known = self.context.get("user_ids", {}).get(user.pk)
        if known is None and "identities" in getattr(user, "_prefetched_objects_cache", {}):
            known = [identity.external_id for identity in user.identities.all()]
        return user_ids_of(user, known)

    @extend_schema_field(serializers.ListField(child=serializers.ChoiceField(choices=UserFlag.values)))
    def get_flags(self, user) -> list[str]:
        return flags_of(user)

    @extend_schema_field(serializers.DictField(child=serializers.JSONField(), help_text="Engage audience -> value."))
    def get_audiences(self, user) -> dict:
        return user.audience_values()


class UserFilterSerializer(serializers.Serializer):
    user_id = StrictCharField(required=False, max_length=255, help_text="Any userId of the user (aliases too).")
    email = StrictCharField(required=False, max_length=320, help_text="Case-insensitive.")
    flag = serializers.ChoiceField(required=False, choices=UserFlag.values)
    search = StrictCharField(required=False, max_length=255, help_text="In userIds, name, email, billing id.")


class UserUpdateSerializer(serializers.Serializer):
    """Fields an admin may set; ``null`` or ``""`` clears one, an absent one is left alone."""

    name = optional_text(max_length=255)
    # The profile rules say what an email and a billing id may be (codes invalid_email,
    # invalid_billing_id); the schema states a subset of the emails they accept.
    email = optional_text(max_length=320, schema_pattern=EMAIL_PATTERN)
    billing_id = optional_text(schema_pattern=BILLING_ID_PATTERN)

    openapi_extra = {"additionalProperties": False}

    def validate(self, attrs):
        if isinstance(self.initial_data, dict):
            other = sorted(set(self.initial_data) - set(self.fields))
            if other:
                raise serializers.ValidationError({other[0]: "not editable: only name, email and billing_id are"})
        return attrs


@extend_schema_field(
    {
        "type": "object",
        "properties": {field: {"enum": list(FIELD_CHOICES)} for field in CHOOSABLE_FIELDS},
        "additionalProperties": False,
    }
)
class MergeFieldsField(serializers.DictField):
    pass


class MergeRequestSerializer(serializers.Serializer):
    user_ids = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=MAX_ID),
        max_length=100,
        help_text="Kana ids of the users to merge (at least two, counting the survivor).",
    )
    survivor = StrictIntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=MAX_ID,
        help_text="Kana id of the user to keep; default: the user created first.",
    )
    fields = MergeFieldsField(
        required=False,
        child=serializers.ChoiceField(choices=FIELD_CHOICES),
        help_text="Per field (name, email, billing_id), whose value to keep: survivor, absorbed or newest (default).",
    )
    # Without a survivor, user_ids must name two users; with one, one more (the service checks it).
    openapi_extra = {
        "if": {"properties": {"survivor": {"type": "integer"}}, "required": ["survivor"]},
        "then": {"properties": {"user_ids": {"minItems": 1, "uniqueItems": True}}},
        "else": {"properties": {"user_ids": {"minItems": 2, "uniqueItems": True}}},
    }

    def validate_fields(self, value):
        other = sorted(set(value) - set(CHOOSABLE_FIELDS))
        if other:
            raise serializers.ValidationError(f"{other[0]!r} cannot be chosen: only {', '.join(CHOOSABLE_FIELDS)}")
        return value


class ConflictSerializer(serializers.Serializer):
    field = serializers.CharField(
        help_text=(
            "name, email or billing_id; or base_package: the users held live base packages "
            "(comma-separated keys), and the survivor now holds all of them: cancel the one that should end"
        )
    )
    survivor = serializers.CharField(help_text="The survivor's value before the merge (blank: none).")
    absorbed = serializers.CharField(help_text="An absorbed user's value.")
    kept = serializers.CharField(help_text="What the merged user keeps.")


class MergeResultSerializer(serializers.Serializer):
    survivor = UserSerializer()
    absorbed_ids = serializers.ListField(child=serializers.IntegerField(), help_text="Users merged by this request.")
    already_merged = serializers.BooleanField(help_text="True when a previous request had already merged them.")
    conflicts = ConflictSerializer(many=True, help_text="Fields the users held different values of.")


class DuplicateGroupSerializer(serializers.Serializer):
    email = serializers.CharField(help_text="The shared email (lower-cased).")
    users = UserSerializer(many=True)


class MergeRecordSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    survivor = serializers.IntegerField(source="survivor_key", help_text="Kana id of the user that absorbed.")
    absorbed_id = serializers.IntegerField(help_text="Kana id the absorbed user had.")
    absorbed = serializers.JSONField(source="absorbed_snapshot", help_text="The absorbed user as it was.")
    reason = serializers.ChoiceField(choices=MergeReason.values)
    actor = serializers.CharField()
    source = serializers.CharField()
    created_at = serializers.DateTimeField()
    conflicts = ConflictSerializer(many=True, help_text="Fields the two users held different values of.")
    billing_conflict = serializers.BooleanField(help_text="An automatic merge dropped a different billing id.")
    undone_at = serializers.DateTimeField(allow_null=True, help_text="When the merge was undone (null: it stands).")
    undone_by = serializers.CharField(help_text="Who undid it.")


class MergeUndoSerializer(serializers.Serializer):
    merge = MergeRecordSerializer()
    restored = UserSerializer(allow_null=True, help_text="The absorbed user, back with its Kana id.")
    survivor = UserSerializer(allow_null=True, help_text="The user that had absorbed it, as it is now.")
    already_undone = serializers.BooleanField(help_text="True when a previous request had undone it.")


class MergeFilterSerializer(serializers.Serializer):
    user = serializers.IntegerField(
        required=False, min_value=1, max_value=MAX_ID, help_text="Kana id of a survivor: its merges only."
    )


# --- Usage ------------------------------------------------------------------------------


class RangeSerializer(serializers.Serializer):
    # An end before the start is an empty range (no usage), not an error: a schema cannot
    # compare two parameters, so refusing it would refuse requests the schema allows.
    start = serializers.DateTimeField(required=False, help_text="Inclusive, ISO 8601.")
    end = serializers.DateTimeField(required=False, help_text="Exclusive, ISO 8601; before start: no usage.")


class UsageFilterSerializer(RangeSerializer):
    user_id = StrictCharField(required=False, max_length=255, help_text="A userId (any of the user's).")
    feature = StrictCharField(required=False, max_length=100, help_text="A feature id.")


class _Total(serializers.DecimalField):
    def __init__(self, **kwargs):
        super().__init__(max_digits=None, decimal_places=None, coerce_to_string=False, **kwargs)


class UsageRowSerializer(serializers.Serializer):
    user = serializers.IntegerField(
        allow_null=True, help_text="Kana id of the user (null: usage of deleted users whose events were kept)."
    )
    user_id = serializers.CharField(allow_null=True, help_text="The user's canonical userId (null: a bare user).")
    feature = serializers.CharField(help_text="Feature id.")
    total = _Total(help_text="Sum of the usage amounts.")


class UserUsageRowSerializer(UsageRowSerializer):
    name = serializers.CharField(help_text="Feature name.")
    type = serializers.ChoiceField(choices=FeatureType.values)


# --- Features and rules -----------------------------------------------------------------


class FeatureSerializer(serializers.Serializer):
    id = StrictCharField(
        source="key", max_length=100, schema_pattern=FEATURE_ID_PATTERN, help_text="The featureId events name."
    )
    name = StrictCharField(required=False, allow_blank=True, max_length=255)
    type = serializers.ChoiceField(choices=FeatureType.values, default=FeatureType.CONSUMABLE)
    unit_label = StrictCharField(required=False, allow_blank=True, max_length=100, help_text='One unit: "message".')
    unit_label_plural = StrictCharField(required=False, allow_blank=True, max_length=100, help_text='"messages".')
    metadata = serializers.DictField(required=False, help_text="Free JSON object kept with the feature.")
    archived = serializers.SerializerMethodField(help_text="Archived: no new usage is recorded; history is kept.")
    created_at = serializers.DateTimeField(read_only=True)

    def get_archived(self, feature) -> bool:
        return feature.archived_at is not None


class FeatureUpdateSerializer(serializers.Serializer):
    name = StrictCharField(required=False, allow_blank=True, max_length=255)
    type = serializers.ChoiceField(required=False, choices=FeatureType.values)
    archived = StrictBooleanField(required=False)
    unit_label = StrictCharField(required=False, allow_blank=True, max_length=100)
    unit_label_plural = StrictCharField(required=False, allow_blank=True, max_length=100)
    metadata = serializers.DictField(required=False)


@extend_schema_field(JSON_VALUE_REF)
class JsonValueField(serializers.JSONField):
    """Any JSON value, documented as one that PostgreSQL can store (no NUL)."""


class ConditionSerializer(serializers.Serializer):
    property = serializers.CharField(max_length=255, help_text="Dot path into the properties, e.g. plan.tier.")
    operator = serializers.ChoiceField(choices=OPERATORS)
    value = JsonValueField(required=False, help_text="A list for `in`; a number for gt/gte/lt/lte.")

    # What features.rules.clean_conditions requires of the value, operator by operator; other
    # keys are ignored, but no text in a condition may contain NUL.
    openapi_extra = {
        "propertyNames": {"pattern": TEXT_PATTERN},
        "additionalProperties": JSON_VALUE_REF,
        "allOf": [
            {
                "if": {"properties": {"operator": {"const": "in"}}},
                "then": {"required": ["value"], "properties": {"value": {"type": "array"}}},
            },
            {
                "if": {"properties": {"operator": {"enum": ["gt", "gte", "lt", "lte"]}}},
                "then": {
                    "required": ["value"],
                    "properties": {
                        "value": {"anyOf": [{"type": "number"}, {"type": "string", "pattern": NUMBER_TEXT_PATTERN}]}
                    },
                },
            },
            {
                "if": {"properties": {"operator": {"const": "exists"}}},
                "then": {"properties": {"value": {"type": ["boolean", "null"]}}},
            },
            {
                "if": {"properties": {"operator": {"enum": ["equals", "not_equals", "contains"]}}},
                "then": {"required": ["value"], "properties": {"value": {"not": {"type": "null"}}}},
            },
        ],
    }


@extend_schema_field(ConditionSerializer(many=True))
class ConditionsField(serializers.JSONField):
    """Conditions pass through as JSON: the rules service validates them and names the
    offending one (``conditions[1].operator``) in its error."""


class ProgressSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["queued", "running", "done", "failed"])
    scanned = serializers.IntegerField()
    mapped = serializers.IntegerField()
    error = serializers.CharField(required=False, help_text='Why the job failed: only when status is "failed".')


class RuleSerializer(serializers.Serializer):
    """A mapping rule as read, and (``id``, ``created_at``, ``reprocessing`` aside) as written."""

    id = serializers.IntegerField(read_only=True)
    name = StrictCharField(max_length=255)
    feature = StrictCharField(
        source="feature.key", max_length=100, schema_pattern=FEATURE_ID_PATTERN, help_text="The feature's id."
    )
    event = optional_text(
        source="event_name", max_length=255, help_text="Event name the rule needs, or null for any event."
    )
    conditions = ConditionsField(required=False, default=list)
    amount_property = optional_text(max_length=255, help_text="Property holding the amount (default: `delta`, else 1).")
    active = StrictBooleanField(required=False, default=True)
    created_at = serializers.DateTimeField(read_only=True)
    reprocessing = serializers.SerializerMethodField()

    @extend_schema_field(ProgressSerializer)
    def get_reprocessing(self, rule) -> dict:
        progress = self.context.get("reprocessing", {}).get(rule.pk) or reprocessing_of(rule)
        body = {"status": progress.status, "scanned": progress.scanned, "mapped": progress.mapped}
        if progress.status == "failed":
            body["error"] = progress.error
        return body


# A rule needs an event name or at least one condition (features.services).
_EVENT_OR_CONDITION = {
    "anyOf": [
        {"required": ["event"], "properties": {"event": {"type": "string", "pattern": NOT_BLANK_TEXT_PATTERN}}},
        {"required": ["conditions"], "properties": {"conditions": {"minItems": 1}}},
    ]
}


class RuleUpdateSerializer(RuleSerializer):
    """A change to a rule: any of its fields. One that sets both ``event`` and ``conditions``
    may not leave the rule with neither."""

    openapi_extra = {
        "not": {
            "required": ["event", "conditions"],
            "properties": {
                "event": {"anyOf": [{"type": "null"}, {"type": "string", "not": {"pattern": NOT_BLANK_TEXT_PATTERN}}]},
                "conditions": {"maxItems": 0},
            },
        }
    }


class RuleCreateSerializer(RuleSerializer):
    """A rule's body when creating one."""

    openapi_extra = _EVENT_OR_CONDITION


class RulePreviewRequestSerializer(RuleSerializer):
    """A rule's body as for creating it; the name may be left out."""

    openapi_extra = _EVENT_OR_CONDITION

    name = StrictCharField(max_length=255, required=False, allow_blank=True, default="")


class PreviewPeriodSerializer(serializers.Serializer):
    start = serializers.DateTimeField(help_text="First instant of the month (UTC).")
    end = serializers.DateTimeField(help_text="First instant of the next month.")
    matched = serializers.IntegerField()
    amount = _Total()


class RulePreviewSerializer(serializers.Serializer):
    matched_events = serializers.IntegerField(help_text="Stored unmapped events the rule would map.")
    amount_total = _Total(help_text="Sum of the amounts it would record.")
    users_affected = serializers.IntegerField()
    by_period = PreviewPeriodSerializer(many=True, help_text="Per month of occurred_at.")
    sample = serializers.ListField(child=serializers.IntegerField(), help_text="Up to 20 event ids, lowest first.")


# --- Events -----------------------------------------------------------------------------


class EventSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    message_id = serializers.CharField()
    type = serializers.CharField()
    event = serializers.CharField(source="name", help_text='Track event name, or "Viewed <name> Page".')
    user = serializers.IntegerField(source="user_id", allow_null=True, help_text="Kana id of the user now.")
    user_id = serializers.CharField(source="external_user_id", help_text="The userId as sent.")
    properties = serializers.DictField(child=serializers.JSONField())
    status = serializers.ChoiceField(choices=EventStatus.values)
    unmapped_reason = serializers.CharField()
    warnings = serializers.JSONField()
    occurred_at = serializers.DateTimeField()
    received_at = serializers.DateTimeField()
    payload = serializers.JSONField(help_text="The message as received (batch context applied).")
    voided_at = serializers.DateTimeField(allow_null=True, help_text="When the event was voided (null: not voided).")
    void_reason = serializers.CharField(help_text="Why it was voided (empty: not voided).")


class EventVoidSerializer(serializers.Serializer):
    reason = StrictCharField(max_length=500, help_text="Why the event is voided; kept with it.")


class EventFilterSerializer(serializers.Serializer):
    status = serializers.ChoiceField(required=False, choices=EventStatus.values)
    event = StrictCharField(required=False, max_length=255, help_text="Event name.")
    user_id = StrictCharField(required=False, max_length=255, help_text="A userId (any of the user's).")


class UnmappedFilterSerializer(serializers.Serializer):
    event = StrictCharField(required=False, max_length=255, help_text="Property counts for this event only.")


class UnmappedEventSerializer(serializers.Serializer):
    event = serializers.CharField()
    reason = serializers.CharField()
    count = serializers.IntegerField()


class UnmappedPropertySerializer(serializers.Serializer):
    property = serializers.CharField(help_text="Dot path, usable as a rule condition as it is.")
    value = serializers.JSONField(allow_null=True)
    count = serializers.IntegerField()


class UnmappedSummarySerializer(serializers.Serializer):
    events = UnmappedEventSerializer(many=True, help_text="Unmapped events by name and reason (all of them).")
    sampled_events = serializers.IntegerField(help_text="How many recent unmapped events the properties cover.")
    properties = UnmappedPropertySerializer(many=True)


# --- Audit log ----------------------------------------------------------------------------


class AuditEntrySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    actor = serializers.CharField(help_text='"api-key:<prefix>", "user:<username>", "segment" or "cli".')
    action = serializers.CharField(help_text='"feature.create", "rule.update", "merge", "event.void", …')
    object_type = serializers.CharField()
    object_id = serializers.CharField()
    before = serializers.JSONField(allow_null=True, help_text="A summary of the object before the action.")
    after = serializers.JSONField(allow_null=True, help_text="A summary of the object after the action.")
    created_at = serializers.DateTimeField()


class AuditFilterSerializer(serializers.Serializer):
    action = StrictCharField(required=False, max_length=64, help_text='e.g. "feature.delete".')
    object_type = StrictCharField(required=False, max_length=64, help_text='e.g. "feature", "user", "event".')


# --- Webhooks ---------------------------------------------------------------------------


def _event_types(**kwargs) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.ChoiceField(choices=WebhookEventType.values),
        allow_empty=False,
        min_length=1,
        max_length=10,
        help_text="The event types sent to this URL.",
        **kwargs,
    )


def _thresholds(**kwargs) -> serializers.ListField:
    return serializers.ListField(
        child=BudgetFractionField(),
        max_length=10,
        help_text=(
            "Fractions of a budget (0 < t <= 1) whose crossing sends `usage.threshold_reached` here "
            "(default [0.8, 1.0]); other crossings are not sent to this URL."
        ),
        **kwargs,
    )


class WebhookSerializer(serializers.Serializer):
    """A webhook endpoint as read: never its secret, which only the creation answer shows."""

    id = serializers.IntegerField()
    url = serializers.CharField()
    events = serializers.ListField(child=serializers.ChoiceField(choices=WebhookEventType.values))
    thresholds = serializers.ListField(child=serializers.FloatField())
    active = serializers.BooleanField(help_text="An inactive endpoint is sent nothing; its pending deliveries fail.")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class WebhookCreatedSerializer(WebhookSerializer):
    secret = serializers.CharField(
        help_text="Signs every delivery (`Kana-Signature`). Shown only in this answer: keep it now."
    )


# What webhooks.services.clean_url accepts, as far as a pattern can say it: an http(s) URL
# naming a host by name (a port of up to 4 digits, a path of printable ASCII). Literal
# addresses are not in the pattern: private ones are refused, and a name is what users give.
WEBHOOK_URL_PATTERN = (
    r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z][A-Za-z0-9-]*(\.[A-Za-z][A-Za-z0-9-]*)+(:[0-9]{1,4})?(/[!-~]*)?$"
)


class WebhookCreateSerializer(serializers.Serializer):
    url = StrictCharField(max_length=2000, schema_pattern=WEBHOOK_URL_PATTERN, help_text="An http:// or https:// URL.")
    events = _event_types()
    thresholds = _thresholds(required=False)
    active = StrictBooleanField(required=False, default=True)


def _only_known_fields(serializer: serializers.Serializer) -> None:
    if isinstance(serializer.initial_data, dict):
        other = sorted(set(serializer.initial_data) - set(serializer.fields))
        if other:
            editable = ", ".join(serializer.fields)
            raise serializers.ValidationError({other[0]: f"not editable: only {editable} are"})


class WebhookUpdateSerializer(serializers.Serializer):
    """Fields that may change; an absent one is left alone. The secret cannot be changed."""

    openapi_extra = {"additionalProperties": False}

    url = StrictCharField(
        required=False, max_length=2000, schema_pattern=WEBHOOK_URL_PATTERN, help_text="An http:// or https:// URL."
    )
    events = _event_types(required=False)
    thresholds = _thresholds(required=False)
    active = StrictBooleanField(required=False)

    def validate(self, attrs):
        _only_known_fields(self)
        return attrs


class WebhookRotateSecretSerializer(serializers.Serializer):
    openapi_extra = {"additionalProperties": False}

    previous_valid_seconds = StrictIntegerField(
        required=False,
        default=DEFAULT_PREVIOUS_SECRET_SECONDS,
        min_value=0,
        max_value=MAX_PREVIOUS_SECRET_SECONDS,
        help_text=(
            "How long the old secret still signs deliveries (a second `v1=` in `Kana-Signature`) while the "
            "receiver switches; default a day, 0 stops it at once (a leaked secret)."
        ),
    )

    def validate(self, attrs):
        _only_known_fields(self)
        return attrs


class WebhookPayloadSerializer(serializers.Serializer):
    """The body every attempt of a delivery POSTs (the same bytes each time)."""

    id = serializers.IntegerField(source="pk", help_text="The event's id: the same for every delivery and retry of it.")
    type = serializers.ChoiceField(source="event_type", choices=WebhookEventType.values)
    created = serializers.DateTimeField(source="created_at")
    data = serializers.JSONField()


class DeliveryAttemptSerializer(serializers.Serializer):
    number = serializers.IntegerField(help_text="1 for the first attempt.")
    attempted_at = serializers.DateTimeField()
    status_code = serializers.IntegerField(allow_null=True, help_text="null: no answer (see `error`).")
    response = serializers.CharField(source="response_excerpt", help_text="The start of the response body.")
    error = serializers.CharField(help_text="Why no answer came (timeout, refused connection); empty otherwise.")
    duration_ms = serializers.IntegerField()


class WebhookDeliverySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    event = WebhookPayloadSerializer()
    status = serializers.ChoiceField(choices=DeliveryStatus.values)
    attempt_count = serializers.IntegerField()
    next_attempt_at = serializers.DateTimeField(allow_null=True, help_text="When it is tried next (null: finished).")
    last_status_code = serializers.IntegerField(allow_null=True)
    last_error = serializers.CharField()
    created_at = serializers.DateTimeField()
    attempts = DeliveryAttemptSerializer(source="attempt_log.all", many=True, help_text="Oldest first.")


class UserDeleteQuerySerializer(serializers.Serializer):
    events = serializers.ChoiceField(
        required=False,
        choices=DELETE_EVENTS_CHOICES,
        help_text="`keep` (default): events and usage stay, detached and anonymised; `delete`: they go too.",
    )
    suppress = serializers.BooleanField(
        required=False,
        default=True,
        help_text=(
            "`true` (default): the user's userIds are suppressed, later messages naming them are not stored "
            "(`/api/v1/suppressions` lists them and lifts one); `false`: the next identify creates the user anew."
        ),
    )


class SuppressionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    user_id = serializers.CharField(help_text="The suppressed userId: messages naming it are answered `suppressed`.")
    created_at = serializers.DateTimeField(help_text="When its user was deleted.")


class SuppressionFilterSerializer(serializers.Serializer):
    user_id = StrictCharField(required=False, max_length=255, help_text="Only this userId (exact).")


# --- The workspace's settings -------------------------------------------------------------


class WorkspaceSettingsSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    name = serializers.CharField()
    anonymous_events = serializers.ChoiceField(
        choices=AnonymousEvents.values,
        help_text="`reject` (default): an event with only an anonymousId is a 400 `anonymous_event`; "
        "`hold`: it is stored as pending until an identify or alias names that anonymousId.",
    )
    anonymous_hold_days = serializers.IntegerField(
        min_value=ANONYMOUS_HOLD_DAYS_MIN,
        max_value=ANONYMOUS_HOLD_DAYS_MAX,
        help_text="How long pending anonymous events wait for their user before they expire.",
    )
    anonymous_pending = serializers.IntegerField(
        read_only=True, help_text="Held anonymous events waiting for an identify or alias."
    )
    anonymous_expired = serializers.IntegerField(
        read_only=True, help_text="Held anonymous events whose hold window passed: kept, counted, never mapped."
    )


class WorkspaceSettingsUpdateSerializer(serializers.Serializer):
    name = StrictCharField(required=False, max_length=200)
    anonymous_events = serializers.ChoiceField(required=False, choices=AnonymousEvents.values)
    anonymous_hold_days = StrictIntegerField(
        required=False, min_value=ANONYMOUS_HOLD_DAYS_MIN, max_value=ANONYMOUS_HOLD_DAYS_MAX
    )
