"""JSON shapes of packages, subscriptions, checks, usage records, consumes and reservations (SPEC §11)."""

from decimal import Context, Decimal

from rest_framework import serializers

from entitlements.access import reservation_status
from entitlements.models import PackageStatus, ResetPeriod, SubscriptionStatus
from entitlements.periods import MONTH, period_containing

from .serializers import StrictBooleanField, StrictCharField, StrictIntegerField

KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,100}$"
# What a usage amount may be: the usage column's range (30 digits, 9 after the point).
MAX_AMOUNT = Decimal("1e20")


class StrictNumberField(serializers.DecimalField):
    """A JSON number (never a string or a boolean), kept as a Decimal."""

    def __init__(self, **kwargs):
        kwargs.setdefault("max_digits", 30)
        kwargs.setdefault("decimal_places", 9)
        kwargs.setdefault("max_value", MAX_AMOUNT)
        kwargs.setdefault("min_value", -MAX_AMOUNT)
        super().__init__(coerce_to_string=False, **kwargs)

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("invalid")
        value = Decimal(str(data))
        if not value.is_finite():
            self.fail("invalid")
        if abs(value) > MAX_AMOUNT:  # before any rounding: a huge number has no place to round to
            self.fail("max_value" if value > 0 else "min_value", max_value=MAX_AMOUNT, min_value=-MAX_AMOUNT)
        return super().to_internal_value(str(data))

    def validate_precision(self, value):
        # More decimals than the column keeps are rounded to them, not refused.
        return value.quantize(Decimal(1).scaleb(-self.decimal_places), context=Context(prec=60))


class QueryAmountField(serializers.DecimalField):
    """A number in a query string, stated as a number (never ""), rounded to the usage
    column's 9 decimals as a JSON amount is, at most MAX_AMOUNT."""

    def __init__(self, **kwargs):
        kwargs.setdefault("max_value", MAX_AMOUNT)
        super().__init__(max_digits=30, decimal_places=9, coerce_to_string=False, **kwargs)

    def validate_precision(self, value):
        # Runs before the min/max validators: a huge number has no place to round to.
        if abs(value) > MAX_AMOUNT:
            low = self.min_value if self.min_value is not None else -MAX_AMOUNT
            self.fail("max_value" if value > 0 else "min_value", max_value=MAX_AMOUNT, min_value=low)
        return value.quantize(Decimal(1).scaleb(-self.decimal_places), context=Context(prec=60))


# --- Packages ------------------------------------------------------------------------------


class PackageFeatureSerializer(serializers.Serializer):
    feature = StrictCharField(max_length=100, help_text="The feature's id.")
    limit = StrictNumberField(
        required=False, allow_null=True, default=None, min_value=Decimal(0), help_text="Per period; null: unlimited."
    )
    overage_enabled = StrictBooleanField(required=False, default=False)
    reset_period = serializers.ChoiceField(choices=ResetPeriod.values, default=ResetPeriod.MONTH)


class PackageFeatureOutSerializer(serializers.Serializer):
    feature = serializers.CharField(source="feature.key")
    limit = serializers.FloatField(allow_null=True)
    overage_enabled = serializers.BooleanField()
    reset_period = serializers.ChoiceField(choices=ResetPeriod.values)


class PackageSerializer(serializers.Serializer):
    id = serializers.CharField(source="key", help_text="The package's id, given by you (e.g. pro-plan).")
    name = serializers.CharField()
    is_addon = serializers.BooleanField()
    status = serializers.ChoiceField(choices=PackageStatus.values)
    metadata = serializers.DictField()
    features = PackageFeatureOutSerializer(many=True, source="features.all")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class PackageCreateSerializer(serializers.Serializer):
    id = serializers.RegexField(KEY_PATTERN, max_length=100)
    name = StrictCharField(required=False, allow_blank=True, max_length=255)
    is_addon = StrictBooleanField(required=False, default=False)
    status = serializers.ChoiceField(choices=[PackageStatus.DRAFT, PackageStatus.PUBLISHED], default="draft")
    metadata = serializers.DictField(required=False)
    features = PackageFeatureSerializer(many=True, required=False)


class PackageUpdateSerializer(serializers.Serializer):
    name = StrictCharField(required=False, allow_blank=True, max_length=255)
    is_addon = StrictBooleanField(required=False)
    status = serializers.ChoiceField(required=False, choices=PackageStatus.values)
    metadata = serializers.DictField(required=False)
    features = PackageFeatureSerializer(many=True, required=False)


# --- Subscriptions -------------------------------------------------------------------------


class PeriodSerializer(serializers.Serializer):
    start = serializers.DateTimeField()
    end = serializers.DateTimeField(allow_null=True, help_text="null: the period never ends (reset_period never).")


class SubscriptionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    user_id = serializers.CharField(allow_null=True, source="user.user_id", default=None)
    group_id = serializers.CharField(allow_null=True, source="group.group_id", default=None)
    package = serializers.CharField(source="package.key")
    status = serializers.ChoiceField(choices=SubscriptionStatus.values)
    started_at = serializers.DateTimeField(help_text="The period anchor.")
    cancelled_at = serializers.DateTimeField(allow_null=True)
    current_period = serializers.SerializerMethodField(help_text="The billing period (monthly from the anchor).")

    def get_current_period(self, subscription) -> PeriodSerializer:
        start, end = period_containing(subscription.started_at, MONTH, self.context["now"])
        return {"start": start.isoformat(), "end": end.isoformat()}


class SubscriptionCreateSerializer(serializers.Serializer):
    user_id = StrictCharField(required=False, max_length=255, help_text="A userId; or give group_id.")
    group_id = StrictCharField(required=False, max_length=255, help_text="A Segment groupId; or give user_id.")
    package = StrictCharField(max_length=100)
    status = serializers.ChoiceField(choices=SubscriptionStatus.values, default=SubscriptionStatus.ACTIVE)
    started_at = serializers.DateTimeField(required=False, help_text="The period anchor; default now.")

    openapi_extra = {"oneOf": [{"required": ["user_id"]}, {"required": ["group_id"]}]}

    def validate(self, data):
        if ("user_id" in data) == ("group_id" in data):
            raise serializers.ValidationError({"user_id": "give user_id or group_id (one of them)"})
        return data


class SubscriptionUpdateSerializer(serializers.Serializer):
    package = StrictCharField(required=False, max_length=100, help_text="Another package of the same kind.")
    status = serializers.ChoiceField(required=False, choices=SubscriptionStatus.values)


class SubscriptionFilterSerializer(serializers.Serializer):
    user_id = serializers.CharField(required=False, max_length=255)
    group_id = serializers.CharField(required=False, max_length=255)
    status = serializers.ChoiceField(required=False, choices=SubscriptionStatus.values)


# --- Checks, usage, consumes ------------------------------------------------------------------


class SubjectQuerySerializer(serializers.Serializer):
    # A query cannot state "exactly one of two parameters" in OpenAPI, so the answer does not
    # need it: user_id wins when both are given, and naming no subject is asking about a
    # subject Kana does not know (reason ``unknown_user``), like any unknown id.
    user_id = serializers.CharField(
        required=False, max_length=255, help_text="A userId; or give group_id (user_id wins when both are given)."
    )
    group_id = serializers.CharField(required=False, max_length=255, help_text="A Segment groupId.")
    feature = serializers.CharField(max_length=100, help_text="The feature's id.")


class CheckQuerySerializer(SubjectQuerySerializer):
    delta = QueryAmountField(required=False, default=Decimal(1), min_value=Decimal(0))


class UsageQuerySerializer(SubjectQuerySerializer):
    past = serializers.IntegerField(required=False, default=6, min_value=0, max_value=36)


class ConsumptionSerializer(serializers.Serializer):
    used = serializers.FloatField()
    budget = serializers.FloatField(allow_null=True, help_text="null: unlimited.")
    remaining = serializers.FloatField(allow_null=True)
    held = serializers.FloatField(help_text="What unexpired reservations hold of the budget.")
    overage_enabled = serializers.BooleanField()


REASONS = [
    "binary_access",
    "within_limit",
    "overage_enabled",
    "limit_reached",
    "no_subscription",
    "subscription_inactive",
    "feature_not_in_package",
    "unknown_user",
    "unknown_group",
    "unknown_feature",
]


class CheckSerializer(serializers.Serializer):
    access = serializers.BooleanField()
    reason = serializers.ChoiceField(choices=REASONS)
    message = serializers.CharField()
    consumption = ConsumptionSerializer(allow_null=True)
    period = PeriodSerializer(allow_null=True)


class PeriodUsageSerializer(serializers.Serializer):
    start = serializers.DateTimeField()
    end = serializers.DateTimeField(allow_null=True)
    consumption = ConsumptionSerializer()


class UsageHistorySerializer(serializers.Serializer):
    reason = serializers.ChoiceField(choices=REASONS)
    current = PeriodUsageSerializer(allow_null=True, help_text="null: no budget for this feature.")
    past = PeriodUsageSerializer(many=True)


class RecordSerializer(serializers.Serializer):
    user_id = StrictCharField(max_length=255)
    feature = StrictCharField(max_length=100)
    delta = StrictNumberField(help_text="add: the amount; set: the value the period's used becomes.")
    action = serializers.ChoiceField(choices=["add", "set"], default="add")
    idempotency_key = StrictCharField(
        max_length=100, help_text="Unique per workspace forever, shared with Segment's messageIds."
    )
    occurred_at = serializers.DateTimeField(required=False, help_text="Default now.")


class RecordAnswerSerializer(serializers.Serializer):
    recorded = serializers.BooleanField()
    reason = serializers.CharField()
    message = serializers.CharField(required=False)
    consumption = ConsumptionSerializer(allow_null=True, required=False)


class ConsumeSerializer(serializers.Serializer):
    user_id = StrictCharField(max_length=255)
    feature = StrictCharField(max_length=100)
    delta = StrictNumberField(required=False, default=Decimal(1), min_value=Decimal(0))
    idempotency_key = StrictCharField(max_length=100)


class ConsumeAnswerSerializer(serializers.Serializer):
    access = serializers.BooleanField(required=False)
    recorded = serializers.BooleanField()
    reason = serializers.CharField()
    message = serializers.CharField(required=False)
    consumption = ConsumptionSerializer(allow_null=True, required=False)
    period = PeriodSerializer(allow_null=True, required=False)


# --- Reservations ----------------------------------------------------------------------------


class ReservationCreateSerializer(serializers.Serializer):
    user_id = StrictCharField(max_length=255)
    feature = StrictCharField(max_length=100)
    amount = StrictNumberField(min_value=Decimal(0))
    ttl_seconds = StrictIntegerField(min_value=1, max_value=7 * 24 * 3600)
    idempotency_key = StrictCharField(max_length=100)


class ReservationCommitSerializer(serializers.Serializer):
    amount = StrictNumberField(required=False, min_value=Decimal(0), help_text="At most the held amount; default all.")


class ReservationSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.ChoiceField(choices=["held", "committed", "released", "expired"])
    user_id = serializers.CharField(source="user.user_id", allow_null=True)
    feature = serializers.CharField(source="feature.key")
    amount = serializers.FloatField()
    committed_amount = serializers.FloatField(allow_null=True)
    expires_at = serializers.DateTimeField()
    created_at = serializers.DateTimeField()

    def to_representation(self, reservation):
        data = super().to_representation(reservation)
        data["status"] = reservation_status(reservation)
        return data
