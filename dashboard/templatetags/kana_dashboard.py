"""Small display filters for the dashboard templates."""

import json
from datetime import datetime, timedelta
from urllib.parse import urlencode

from django import template
from django.utils import timezone
from django.utils.timesince import timesince

from users.models import UserFlag

from ..forms import OPERATOR_LABELS, format_value

register = template.Library()

_FLAG_SHORT = {
    UserFlag.NO_BILLING_ID.value: "no billing id",
    UserFlag.SAME_EMAIL.value: "same email",
    UserFlag.BILLING_CONFLICT.value: "billing conflict",
}
_FIELD_LABELS = {"name": "Name", "email": "Email", "billing_id": "Billing id"}


@register.inclusion_tag("dashboard/_pagination.html")
def pagination(page, **keep):
    """Newer/older links for ``page`` that keep the list's other query parameters."""
    return {"page": page, "keep": "".join(f"{urlencode({name: value or ''})}&" for name, value in keep.items())}


@register.filter
def flag_label(flag: str) -> str:
    return _FLAG_SHORT.get(flag, flag)


@register.filter
def condition_text(condition: dict) -> str:
    """``plan.tier equals pro`` for a stored rule condition."""
    operator = OPERATOR_LABELS.get(condition.get("operator"), condition.get("operator"))
    if "value" not in condition:
        return f"{condition.get('property')} {operator}"
    value = condition["value"]
    shown = ", ".join(format_value(v) for v in value) if isinstance(value, list) else format_value(value)
    return f"{condition.get('property')} {operator} {shown}"


@register.filter
def as_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@register.filter
def field_label(field: str) -> str:
    """``billing_id`` -> ``Billing id``: a user field as the pages name it."""
    return _FIELD_LABELS.get(field, field)


@register.filter
def ago(moment: datetime | None) -> str:
    """``just now`` under a minute (Django's timesince says "0 minutes"), else ``3 hours ago``."""
    if moment is None:
        return ""
    if timezone.now() - moment < timedelta(minutes=1):
        return "just now"
    return f"{timesince(moment, depth=1)} ago"


# Service refusals whose API wording ("null", "features[0]") does not fit a form.
_SERVICE_WORDS = {
    "binary_feature_limit": "An on/off (BINARY) feature has no limit: leave the limit empty.",
    "duplicate_feature": "Each feature appears in a package once: remove the repeated row.",
    "invalid_limit": "A limit is 0 or more; leave it empty for unlimited.",
    "invalid_package_id": "A package id is 1–100 letters, digits, _ . : or -.",
}


def service_message(exc) -> str:
    """A DomainError's message as a sentence of the dashboard."""
    message = _SERVICE_WORDS.get(exc.code, exc.message)
    return message[:1].upper() + message[1:]


# What an entitlement check's reason means, as the user's entitlements page says it.
REASON_WORDS = {
    "binary_access": "Access: an on/off feature included in a live package",
    "within_limit": "Within the limit",
    "overage_enabled": "Over the limit, and the package allows overage",
    "limit_reached": "Limit reached: the next unit is refused",
    "no_subscription": "No subscription",
    "subscription_inactive": "Subscription inactive (none active or trialing)",
    "feature_not_in_package": "Not in any live package",
    "unknown_user": "No such user",
    "unknown_group": "No such group",
    "unknown_feature": "No such feature",
}


@register.filter
def reason_words(reason: str) -> str:
    return REASON_WORDS.get(reason, reason)
