"""Load sample data into the demo workspace, so the dashboard has something to show.

    python manage.py demo_data [--workspace Demo]

It lives with Segment's endpoints because it is Segment's messages that it replays.

Everything goes through the services Segment's messages and the dashboard use: messages are
parsed (``segment_ingest.messages.parse_message``) and applied (``features.ingest``) as
``/v1/batch`` would apply them, features and the rule come from ``features.services``, the
Stripe customer without a userId from ``users.services``. Running it again changes nothing:
every message has a fixed messageId (a replay is ignored) and existing features, rules and
users are left as they are.

What there is to see: users (two pairs sharing an email to review, one pair with two billing
ids, users without a billing id, a Stripe customer without a userId), 30 days of usage of
three features, a rule mapping PDF exports, and unmapped events (no rule, a featureId nobody
created, page views) to write rules from.
"""

import random
from datetime import datetime, timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from features.ingest import ingest_messages
from features.models import Event, EventStatus, Feature, FeatureType, MappingRule
from features.services import RuleDefinition, feature_create, rule_create
from kana.models import Workspace
from segment_ingest.messages import parse_message
from users.models import EndUser
from users.profile import validated_changes
from users.services import upsert_user_by_email

DEFAULT_WORKSPACE = "Demo"
DAYS = 30

FEATURES = [
    ("messages", "Messages sent", FeatureType.CONSUMABLE),
    ("exports", "Report exports", FeatureType.CONSUMABLE),
    ("sso", "Single sign-on", FeatureType.BINARY),
]
RULE = RuleDefinition(
    name="PDF exports",
    feature_key="exports",
    event_name="Report Exported",
    conditions=[{"property": "format", "operator": "equals", "value": "pdf"}],
)
# (userId, traits, days ago): two Graces with two billing ids, two Alans, no billing for some.
PEOPLE = [
    ("u-ada", {"name": "Ada Lovelace", "email": "ada@analytical.test", "billingId": "cus_ADA0001"}, 29),
    ("u-grace", {"name": "Grace Hopper", "email": "grace@navy.test", "billingId": "cus_GRACE01"}, 28),
    ("u-grace-phone", {"name": "Grace H.", "email": "Grace@Navy.test", "billingId": "cus_GRACE02"}, 6),
    ("u-linus", {"name": "Linus", "email": "linus@kernel.test"}, 25),
    ("u-margaret", {"name": "Margaret Hamilton", "email": "margaret@apollo.test", "billingId": "hamilton-apollo"}, 21),
    ("u-alan", {"email": "alan@bletchley.test"}, 15),
    ("u-alan-work", {"name": "Alan Turing", "email": "alan@bletchley.test"}, 3),
]
STRIPE_CUSTOMER = {"name": "Katherine Johnson", "email": "katherine@nasa.test", "billing_id": "cus_KJ0001"}


def _resolve_workspace(value: str) -> Workspace:
    found = Workspace.objects.filter(pk=int(value)) if value.isdigit() else Workspace.objects.filter(name=value)
    workspace = found.order_by("pk").first()
    if workspace is None and value == DEFAULT_WORKSPACE:
        workspace = Workspace.objects.create(name=DEFAULT_WORKSPACE)
    if workspace is None:
        raise CommandError(f"no workspace {value!r} (give its id or name)")
    return workspace


def demo_messages(now: datetime) -> list[dict]:
    """The Segment messages of the demo, oldest first; the same ids (and amounts) every run."""
    day = now.replace(hour=12, minute=0, second=0, microsecond=0)
    messages = []

    def add(message_type: str, key: str, days_ago: float, **fields):
        at = (day - timedelta(days=days_ago)).isoformat()
        messages.append({"type": message_type, "messageId": f"demo-{key}", "timestamp": at, **fields})

    for user_id, traits, days_ago in PEOPLE:
        add("identify", f"identify-{user_id}", days_ago, userId=user_id, traits=traits)
    add("alias", "alias-ada", 28, userId="u-ada", previousId="anon-7f3a")
    for user_id in ("u-ada", "u-margaret"):
        add("group", f"group-{user_id}", 20, userId=user_id, groupId="acme-inc", traits={"name": "Acme Inc."})

    draw = random.Random(10)  # fixed: the same usage every run
    for days_ago in range(DAYS - 1, -1, -1):
        for user_id in ("u-ada", "u-grace", "u-linus"):
            if draw.random() < 0.6:
                delta = draw.randint(1, 6)
                properties = {"featureId": "messages", "delta": delta}
                add(
                    "track",
                    f"msg-{user_id}-{days_ago}",
                    days_ago,
                    userId=user_id,
                    event="Message Sent",
                    properties=properties,
                )
        if days_ago % 3 == 0:
            fmt = "pdf" if days_ago % 2 == 0 else "csv"  # csv: no rule maps it
            properties = {"format": fmt, "pages": 1 + days_ago % 7}
            add(
                "track",
                f"export-{days_ago}",
                days_ago,
                userId="u-margaret",
                event="Report Exported",
                properties=properties,
            )
        if days_ago % 5 == 0:
            add(
                "track", f"sso-{days_ago}", days_ago, userId="u-ada", event="SSO Login", properties={"featureId": "sso"}
            )
            invite = {"plan": {"tier": "team" if days_ago % 10 else "pro"}, "seats": 2}
            add("track", f"invite-{days_ago}", days_ago, userId="u-linus", event="Invite Sent", properties=invite)
        if days_ago % 7 == 0:
            seats = {"featureId": "seats", "delta": 1}  # a feature nobody created yet
            add("track", f"seat-{days_ago}", days_ago, userId="u-grace-phone", event="Seat Added", properties=seats)
            add("page", f"pricing-{days_ago}", days_ago, userId="u-alan", name="Pricing")
    return messages


class Command(BaseCommand):
    help = "Load sample users, events, features and a rule into the demo workspace (local runs; idempotent)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--workspace", default=DEFAULT_WORKSPACE, help="id or name (default: Demo, created if missing)"
        )

    def handle(self, *args, workspace: str, **options):
        if not settings.DEBUG:
            raise CommandError("demo_data is for local runs (KANA_DEBUG=1): it adds made-up users and events")
        workspace = _resolve_workspace(workspace)
        now = timezone.now()
        existing = set(Feature.objects.for_workspace(workspace).values_list("key", flat=True))
        for key, name, feature_type in FEATURES:
            if key not in existing:
                feature_create(workspace=workspace, key=key, name=name, type=feature_type)
        if not MappingRule.objects.for_workspace(workspace).filter(name=RULE.name).exists():
            rule_create(workspace=workspace, definition=RULE)

        messages = [parse_message(payload, received_at=now) for payload in demo_messages(now)]
        outcomes = ingest_messages(workspace=workspace, messages=messages)
        if not EndUser.objects.for_workspace(workspace).filter(email_key=STRIPE_CUSTOMER["email"]).exists():
            changes, _problems = validated_changes(**STRIPE_CUSTOMER)
            upsert_user_by_email(workspace=workspace, changes=changes, occurred_at=now - timedelta(days=DAYS))

        new = sum(1 for outcome in outcomes if outcome.status != "duplicate")
        unmapped = Event.objects.for_workspace(workspace).filter(status=EventStatus.UNMAPPED).count()
        counts = {
            "user": EndUser.objects.for_workspace(workspace).count(),
            "unmapped event": unmapped,
            "feature": Feature.objects.for_workspace(workspace).count(),
            "rule": MappingRule.objects.for_workspace(workspace).count(),
        }
        self.stdout.write(
            f"\n  Demo data in workspace {workspace.pk} ({workspace.name}): "
            f"{_count(new, 'new message')} of {len(outcomes)} ({len(outcomes) - new} already there)\n"
            f"  {', '.join(_count(n, noun) for noun, n in counts.items())}\n"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
