"""REST endpoints. Each translates HTTP to one selector or service call and back."""

from django.db.models import Prefetch
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers
from rest_framework.decorators import action
from rest_framework.response import Response

from entitlements.selectors import live_base_subscriptions
from features import selectors as feature_selectors
from features.corrections import event_void
from features.models import Event, Feature, MappingRule, Usage
from features.preview import rule_preview
from features.services import (
    FeatureError,
    RuleDefinition,
    feature_create,
    feature_delete,
    feature_update,
    rule_create,
    rule_delete,
    rule_update,
)
from kana.audit import audit_entries
from kana.models import AuditEntry, Workspace
from kana.services import workspace_settings, workspace_settings_update
from users import selectors as user_selectors
from users.models import EndUser, MergeReason, MergeRecord, Suppression, UserIdentity
from users.profile import validated_changes
from users.services import delete_user, lift_suppression, merge_undo, merge_users, update_user
from webhooks import selectors as webhook_selectors
from webhooks.models import WebhookEndpoint
from webhooks.services import webhook_create, webhook_delete, webhook_rotate_secret, webhook_update

from . import serializers as s
from .base import WorkspaceViewSet
from .schema import ErrorSerializer

# --- Examples shown on the docs page ------------------------------------------------------

USER_EXAMPLE = {
    "id": 42,
    "user_id": "u_123",
    "user_ids": ["u_123", "anon-7f3a"],
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "billing_id": "cus_NffrFeUfNV2Hib",
    "billing_provider": "stripe",
    "created_at": "2025-01-05T10:00:00Z",
    "updated_at": "2025-02-01T08:30:00Z",
    "flags": ["same_email"],
    "audiences": {"power_users": True},
}
RULE_REQUEST = {
    "name": "Pro exports",
    "feature": "exports",
    "event": "Report Exported",
    "conditions": [{"property": "plan.tier", "operator": "equals", "value": "pro"}],
    "amount_property": None,
    "active": True,
}
RULE_EXAMPLE = {
    "id": 7,
    **RULE_REQUEST,
    "created_at": "2025-02-01T08:30:00Z",
    "reprocessing": {"status": "running", "scanned": 5000, "mapped": 312},
}
FEATURE_EXAMPLE = {
    "id": "exports",
    "name": "Report exports",
    "type": "CONSUMABLE",
    "created_at": "2025-02-01T08:30:00Z",
}


def page_of(example: dict) -> dict:
    return {"count": 1, "next": None, "previous": None, "results": [example]}


# --- Users -----------------------------------------------------------------------------


def _base_package_conflicts(held: dict, survivor_pk: int, absorbed_pks: list[int]) -> list[dict]:
    """A merge moves every subscription as it is: users on two plans become one user holding
    two live base packages. Kana does not choose (checks use the highest limit); the answer
    lists it as a conflict whose ``kept`` is both, so the caller can cancel one."""
    survivor_keys = [sub.package.key for sub in held.get(survivor_pk, [])]
    absorbed = [(pk, [sub.package.key for sub in held[pk]]) for pk in absorbed_pks if held.get(pk)]
    if len(survivor_keys) + sum(len(keys) for _, keys in absorbed) < 2:
        return []
    kept = ", ".join([*survivor_keys, *(key for _, keys in absorbed for key in keys)])
    return [
        {"field": "base_package", "survivor": ", ".join(survivor_keys), "absorbed": ", ".join(keys), "kept": kept}
        for _, keys in absorbed
    ]


@extend_schema_view(
    list=extend_schema(
        summary="List users",
        parameters=[s.UserFilterSerializer],
        examples=[OpenApiExample("A page of users", value=page_of(USER_EXAMPLE), response_only=True)],
    ),
    retrieve=extend_schema(
        summary="Get a user", examples=[OpenApiExample("A user", value=USER_EXAMPLE, response_only=True)]
    ),
    destroy=extend_schema(
        summary="Delete a user and suppress its userIds",
        description=(
            "`events=keep` (default): its events and usage stay, detached from any user and anonymised, so "
            "feature totals do not change. `events=delete`: they are deleted, and the totals change. Either "
            "way every userId of the user is suppressed (unless `suppress=false`): later messages naming one "
            'answer 200 `{"status": "suppressed"}` and are not stored. Recorded in the audit log (`user.delete`).'
        ),
        parameters=[s.UserDeleteQuerySerializer],
    ),
)
class UserViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, WorkspaceViewSet):
    model = EndUser
    serializer_class = s.UserSerializer
    http_method_names = ["get", "patch", "post", "delete", "head", "options"]

    def scope(self, users):
        filters = self.query(s.UserFilterSerializer) if self.action == "list" else {}
        identities = UserIdentity.objects.order_by("created_at", "pk")
        return user_selectors.user_list(self.workspace, users=users, **filters).prefetch_related(
            Prefetch("identities", queryset=identities)
        )

    @extend_schema(
        summary="Update a user's name, email or billing id",
        request=s.UserUpdateSerializer,
        responses=s.UserSerializer,
        examples=[
            OpenApiExample(
                "Set email and billing id",
                value={"email": "ada@example.com", "billing_id": "cus_NffrFeUfNV2Hib"},
                request_only=True,
            ),
            OpenApiExample("Clear the name", value={"name": None}, request_only=True),
            OpenApiExample("Updated user", value=USER_EXAMPLE, response_only=True),
        ],
    )
    def partial_update(self, request, pk=None):
        user = self.get_object()
        changes, problems = validated_changes(**self.body(s.UserUpdateSerializer))
        if problems:
            raise problems[0]
        update_user(workspace=self.workspace, user_pk=user.pk, changes=changes, actor=self.actor)
        return Response(self.get_serializer(self.get_queryset().get(pk=user.pk)).data)

    def perform_destroy(self, user):
        options = self.query(s.UserDeleteQuerySerializer)
        delete_user(
            workspace=self.workspace,
            user_pk=user.pk,
            actor=self.actor,
            events=options.get("events", "keep"),
            suppress=options.get("suppress", True),
        )

    @extend_schema(
        summary="Merge users into one",
        description=(
            "Merges the named users (Kana ids) into the one created first, or into `survivor`. "
            "Idempotent: repeating a request finds the users already merged, changes nothing and "
            "answers the same survivor. Every absorbed user is recorded in the ledger (`merges`). "
            "`conflicts` lists the fields the users held different values of and what was kept; "
            "`fields` chooses per field (name, email, billing_id) whose value to keep."
        ),
        request=s.MergeRequestSerializer,
        responses=s.MergeResultSerializer,
        examples=[
            OpenApiExample("Merge into the oldest", value={"user_ids": [42, 57]}, request_only=True),
            OpenApiExample("Pick the survivor", value={"user_ids": [42, 57, 60], "survivor": 57}, request_only=True),
            OpenApiExample(
                "Keep the absorbed user's billing id",
                value={"user_ids": [42, 57], "fields": {"billing_id": "absorbed"}},
                request_only=True,
            ),
            OpenApiExample(
                "Merged",
                value={
                    "survivor": USER_EXAMPLE,
                    "absorbed_ids": [57],
                    "already_merged": False,
                    "conflicts": [
                        {"field": "billing_id", "survivor": "cus_A1", "absorbed": "cus_B2", "kept": "cus_B2"}
                    ],
                },
                response_only=True,
            ),
        ],
    )
    @action(detail=False, methods=["post"])
    def merge(self, request):
        body = self.body(s.MergeRequestSerializer)
        base_packages = live_base_subscriptions(self.workspace, body["user_ids"])
        result = merge_users(
            workspace=self.workspace,
            user_pks=body["user_ids"],
            survivor_pk=body.get("survivor"),
            reason=MergeReason.ADMIN,
            actor=self.actor,
            source="api:users/merge",
            fields=body.get("fields"),
        )
        survivor = self.get_queryset().get(pk=result.survivor.pk)
        data = {
            "survivor": survivor,
            "absorbed_ids": result.absorbed_ids,
            "already_merged": result.already_merged,
            "conflicts": [
                *(c.as_dict() for c in result.conflicts),
                *_base_package_conflicts(base_packages, result.survivor.pk, result.absorbed_ids),
            ],
        }
        return Response(s.MergeResultSerializer(data, context=self.get_serializer_context()).data)

    @extend_schema(
        summary="Groups of users sharing an email",
        responses=s.DuplicateGroupSerializer(many=True),
        examples=[
            OpenApiExample(
                "Two users with one email",
                value=page_of({"email": "ada@example.com", "users": [USER_EXAMPLE]}),
                response_only=True,
            )
        ],
    )
    @action(detail=False, methods=["get"])
    def duplicates(self, request):
        groups = user_selectors.duplicate_groups(self.workspace)

        def user_ids(page):
            return {"user_ids": user_selectors.user_ids_by_user([u.pk for group in page for u in group.users])}

        return self.paginated(groups, s.DuplicateGroupSerializer, context_for_page=user_ids)

    @extend_schema(
        summary="A user's usage, one row per feature",
        parameters=[s.RangeSerializer],
        responses=s.UserUsageRowSerializer(many=True),
        examples=[
            OpenApiExample(
                "Usage of one user",
                value=page_of(
                    {
                        "user": 42,
                        "user_id": "u_123",
                        "feature": "exports",
                        "name": "Exports",
                        "type": "CONSUMABLE",
                        "total": 12,
                    }
                ),
                response_only=True,
            )
        ],
    )
    @action(detail=True, methods=["get"])
    def usage(self, request, pk=None):
        user = self.get_object()
        rows = feature_selectors.user_usage(self.workspace, user_pk=user.pk, **self.query(s.RangeSerializer))
        rows = [{**row, "user": user.pk, "user_id": user.user_id} for row in rows]
        return self.paginated(rows, s.UserUsageRowSerializer)


# --- Features and rules ---------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(
        summary="List features",
        examples=[OpenApiExample("Features", value=page_of(FEATURE_EXAMPLE), response_only=True)],
    ),
    retrieve=extend_schema(summary="Get a feature by its id"),
    create=extend_schema(
        summary="Create a feature",
        description="Events that named this featureId before it existed are reprocessed and mapped.",
        examples=[
            OpenApiExample(
                "A consumable feature",
                value={"id": "exports", "name": "Report exports", "type": "CONSUMABLE"},
                request_only=True,
            ),
            OpenApiExample("Created", value=FEATURE_EXAMPLE, response_only=True),
        ],
    ),
    partial_update=extend_schema(summary="Rename a feature or change its type", request=s.FeatureUpdateSerializer),
    destroy=extend_schema(summary="Delete a feature that no rule uses"),
)
class FeatureViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    WorkspaceViewSet,
):
    model = Feature
    serializer_class = s.FeatureSerializer
    kana_conflicts = {
        "create": "`feature_exists`: a feature with this id exists.",
        "destroy": "`feature_in_use`: rules or recorded usage use it (archive it instead).",
    }
    lookup_field = "key"
    lookup_url_kwarg = "id"
    lookup_value_regex = "[A-Za-z0-9_.:-]{1,100}"
    http_method_names = ["get", "patch", "post", "delete", "head", "options"]

    def scope(self, features):
        return features.order_by("key")

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = feature_create(
            workspace=self.workspace,
            key=data["key"],
            name=data.get("name", ""),
            type=data["type"],
            unit_label=data.get("unit_label", ""),
            unit_label_plural=data.get("unit_label_plural", ""),
            metadata=data.get("metadata"),
            actor=self.actor,
        )

    def partial_update(self, request, id=None):
        feature = feature_update(
            workspace=self.workspace,
            feature=self.get_object(),
            actor=self.actor,
            **self.body(s.FeatureUpdateSerializer),
        )
        return Response(self.get_serializer(feature).data)

    def perform_destroy(self, feature):
        feature_delete(workspace=self.workspace, feature=feature, actor=self.actor)


_DEFINITION = ("feature", "event_name", "conditions", "amount_property")


@extend_schema_view(
    list=extend_schema(
        summary="List mapping rules",
        examples=[OpenApiExample("Rules", value=page_of(RULE_EXAMPLE), response_only=True)],
    ),
    retrieve=extend_schema(
        summary="Get a rule and its reprocessing progress",
        examples=[OpenApiExample("A rule being applied to stored events", value=RULE_EXAMPLE, response_only=True)],
    ),
    create=extend_schema(
        summary="Create a rule",
        description="The workspace's stored unmapped events are reprocessed against it in workers.",
        request=s.RuleCreateSerializer,
        responses={201: s.RuleSerializer},
        examples=[
            OpenApiExample("Pro users' exports", value=RULE_REQUEST, request_only=True),
            OpenApiExample(
                "Any 'Seat Added', amount from properties.seats",
                value={"name": "Seats", "feature": "seats", "event": "Seat Added", "amount_property": "seats"},
                request_only=True,
            ),
            OpenApiExample(
                "Created",
                value={**RULE_EXAMPLE, "reprocessing": {"status": "queued", "scanned": 0, "mapped": 0}},
                response_only=True,
            ),
        ],
    ),
    partial_update=extend_schema(
        summary="Change a rule",
        description="A rule that has mapped events only accepts `name` and `active` (else 409 `rule_in_use`).",
        request=s.RuleUpdateSerializer,
        examples=[OpenApiExample("Deactivate", value={"active": False}, request_only=True)],
    ),
    destroy=extend_schema(summary="Delete a rule that has mapped nothing"),
)
class RuleViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    WorkspaceViewSet,
):
    model = MappingRule
    serializer_class = s.RuleSerializer
    kana_conflicts = {
        "partial_update": "`rule_in_use`: the rule has mapped events, only its name and active flag can change; "
        "`invalid_rule`: the change would leave the rule with neither an event name nor a condition.",
        "destroy": "`rule_in_use`: the rule has mapped events (deactivate it instead).",
    }
    http_method_names = ["get", "patch", "post", "delete", "head", "options"]

    def scope(self, rules):
        return rules.select_related("feature").order_by("-created_at", "-pk")

    def list(self, request):
        def progress(page):
            return {"reprocessing": feature_selectors.reprocessing_by_rule(self.workspace, [r.pk for r in page])}

        return self.paginated(self.get_queryset(), s.RuleSerializer, context_for_page=progress)

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = rule_create(
            workspace=self.workspace,
            definition=RuleDefinition(
                name=data["name"],
                feature_key=data["feature"]["key"],
                event_name=data.get("event_name"),
                conditions=data.get("conditions"),
                amount_property=data.get("amount_property"),
                active=data.get("active", True),
            ),
            actor=self.actor,
        )

    def partial_update(self, request, pk=None):
        rule = self.get_object()
        body = self.body(s.RuleSerializer, partial=True)
        current = {
            "feature": {"key": rule.feature.key},
            "event_name": rule.event_name,
            "conditions": rule.conditions,
            "amount_property": rule.amount_property,
        }
        wanted = {**current, **{name: body[name] for name in _DEFINITION if name in body}}
        for name in ("event_name", "amount_property"):
            wanted[name] = (wanted[name] or "").strip() or None  # as the service stores them
        if wanted != current and wanted["event_name"] is None and not wanted["conditions"]:
            # A rule needs an event name or a condition. A body clearing both is invalid as sent
            # (400, as the schema says); one clearing what this rule has left conflicts with it.
            clears_both = "event_name" in body and "conditions" in body
            raise FeatureError(
                "invalid_rule",
                "a rule needs an event name or at least one condition",
                "conditions",
                status=400 if clears_both else 409,
            )
        definition = None
        # Resending a used rule's definition unchanged is not a change: only a different one is refused.
        if wanted != current:
            definition = RuleDefinition(
                name=body.get("name", rule.name),
                feature_key=wanted["feature"]["key"],
                event_name=wanted["event_name"],
                conditions=wanted["conditions"],
                amount_property=wanted["amount_property"],
            )
        rule = rule_update(
            workspace=self.workspace,
            rule=rule,
            name=body.get("name"),
            active=body.get("active"),
            definition=definition,
            actor=self.actor,
        )
        return Response(self.get_serializer(rule).data)

    def perform_destroy(self, rule):
        rule_delete(workspace=self.workspace, rule=rule, actor=self.actor)

    @extend_schema(
        summary="Preview a rule: what it would map if created now",
        description=(
            "Takes a rule's body (as for creating one; `name` optional) and writes nothing. Answers how many "
            "stored unmapped events the rule would map, the amount, the users, a monthly breakdown and a sample "
            "of event ids: exactly what creating the rule would then map."
        ),
        request=s.RulePreviewRequestSerializer,
        responses=s.RulePreviewSerializer,
        examples=[
            OpenApiExample("Pro exports", value={**RULE_REQUEST, "name": ""}, request_only=True),
            OpenApiExample(
                "Preview",
                value={
                    "matched_events": 312,
                    "amount_total": 312,
                    "users_affected": 41,
                    "by_period": [
                        {"start": "2025-01-01T00:00:00Z", "end": "2025-02-01T00:00:00Z", "matched": 200, "amount": 200},
                        {"start": "2025-02-01T00:00:00Z", "end": "2025-03-01T00:00:00Z", "matched": 112, "amount": 112},
                    ],
                    "sample": [1201, 1207, 1300],
                },
                response_only=True,
            ),
        ],
    )
    @action(detail=False, methods=["post"])
    def preview(self, request):
        body = self.body(s.RulePreviewRequestSerializer)
        preview = rule_preview(
            workspace=self.workspace,
            definition=RuleDefinition(
                name=body.get("name") or "",
                feature_key=body["feature"]["key"],
                event_name=body.get("event_name"),
                conditions=body.get("conditions"),
                amount_property=body.get("amount_property"),
            ),
        )
        return Response(s.RulePreviewSerializer(preview).data)


# --- Events, usage, merges ---------------------------------------------------------------


def list_and_retrieve_schema(list_summary: str, filters: type[serializers.Serializer], retrieve_summary: str):
    """The schema of a read-only view set: its list (filtered by ``filters``' query
    parameters) and its detail view."""
    return extend_schema_view(
        list=extend_schema(summary=list_summary, parameters=[filters]),
        retrieve=extend_schema(summary=retrieve_summary),
    )


@list_and_retrieve_schema("List events, newest first", s.EventFilterSerializer, "Get an event")
class EventViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, WorkspaceViewSet):
    model = Event
    serializer_class = s.EventSerializer

    def scope(self, events):
        if self.action != "list":
            return events
        filters = self.query(s.EventFilterSerializer)
        user_id = filters.pop("user_id", None)
        if user_id is not None:
            filters["user_pk"] = user_selectors.user_pk_for(self.workspace, user_id)
            if filters["user_pk"] is None:
                return events.none()
        return feature_selectors.event_list(self.workspace, events=events, **filters)

    @extend_schema(
        summary="Unmapped events grouped by name and by property value",
        parameters=[s.UnmappedFilterSerializer],
        responses=s.UnmappedSummarySerializer,
        examples=[
            OpenApiExample(
                "What to write a rule for",
                value={
                    "events": [{"event": "Report Exported", "reason": "no_matching_rule", "count": 1250}],
                    "sampled_events": 1250,
                    "properties": [{"property": "plan.tier", "value": "pro", "count": 700}],
                },
                response_only=True,
            )
        ],
    )
    @action(detail=False, methods=["get"], url_path="unmapped/summary", pagination_class=None)
    def unmapped_summary(self, request):
        event = self.query(s.UnmappedFilterSerializer).get("event")
        by_property = feature_selectors.unmapped_by_property(self.workspace, event=event)
        summary = {
            "events": feature_selectors.unmapped_by_event(self.workspace),
            "sampled_events": by_property["sampled_events"],
            "properties": by_property["rows"],
        }
        return Response(s.UnmappedSummarySerializer(summary).data)

    @extend_schema(
        summary="Void an event (a correction)",
        description=(
            "Marks a stored track, page or screen event `voided`, keeping the reason and the time, "
            "and removes its usage, so usage totals drop. The event stays listed (status `voided`) "
            "and is never mapped again, by reprocessing or any other path. Idempotent: voiding a "
            "voided event answers 200 with the event as it is and changes nothing (the first "
            "reason stands). identify, alias and group events (status `processed`) are refused "
            "with 409 `not_voidable`: their effect on users (profile values, merges, group "
            "memberships) is not undone by a void. Recorded in the audit log (`event.void`)."
        ),
        request=s.EventVoidSerializer,
        responses={
            200: s.EventSerializer,
            409: OpenApiResponse(ErrorSerializer, description="`not_voidable`: an identify, alias or group event."),
        },
        examples=[
            OpenApiExample("Sent twice by a broken client", value={"reason": "duplicate send"}, request_only=True)
        ],
    )
    @action(detail=True, methods=["post"])
    def void(self, request, pk=None):
        event = self.get_object()
        event = event_void(
            workspace=self.workspace,
            event_id=event.pk,
            reason=self.body(s.EventVoidSerializer)["reason"],
            actor=self.actor,
        )
        return Response(self.get_serializer(event).data)


@extend_schema_view(
    list=extend_schema(
        summary="Usage totals per user and feature",
        parameters=[s.UsageFilterSerializer],
        examples=[
            OpenApiExample(
                "Totals",
                value=page_of({"user": 42, "user_id": "u_123", "feature": "exports", "total": 12}),
                response_only=True,
            )
        ],
    )
)
class UsageViewSet(mixins.ListModelMixin, WorkspaceViewSet):
    model = Usage
    serializer_class = s.UsageRowSerializer

    def list(self, request):
        filters = self.query(s.UsageFilterSerializer)
        user_id = filters.pop("user_id", None)
        if user_id is not None:
            filters["user_pk"] = user_selectors.user_pk_for(self.workspace, user_id)
            if filters["user_pk"] is None:
                return self.paginated([], s.UsageRowSerializer)
        if "feature" in filters:
            filters["feature_key"] = filters.pop("feature")
        rows = feature_selectors.usage_total_rows(self.workspace, usage=self.get_queryset(), **filters)
        page = [feature_selectors.total_row(row) for row in self.paginate_queryset(rows)]
        canonical = dict(
            EndUser.objects.for_workspace(self.workspace)
            .filter(pk__in={row["user_pk"] for row in page})
            .values_list("pk", "user_id")
        )
        results = [{**row, "user": row["user_pk"], "user_id": canonical.get(row["user_pk"])} for row in page]
        return self.get_paginated_response(s.UsageRowSerializer(results, many=True).data)


@list_and_retrieve_schema("The merge ledger, newest first", s.MergeFilterSerializer, "One merge")
class MergeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, WorkspaceViewSet):
    model = MergeRecord
    serializer_class = s.MergeRecordSerializer
    kana_conflicts = {"undo": "`merge_not_undoable`: a later merge depends on this one; undo it first."}

    def scope(self, records):
        filters = self.query(s.MergeFilterSerializer) if self.action == "list" else {}
        return user_selectors.merge_history(self.workspace, records=records, user_pk=filters.get("user"))

    @extend_schema(
        summary="Undo a merge",
        description=(
            "Restores the absorbed user with its Kana id, userIds, fields, group memberships and "
            "every event addressed to one of its userIds (with its usage); the survivor keeps the "
            "rest. A later merge that depends on this one must be undone first: 409 "
            "`merge_not_undoable` names it. Undoing an undone merge changes nothing."
        ),
        request=None,
        responses=s.MergeUndoSerializer,
    )
    @action(detail=True, methods=["post"])
    def undo(self, request, pk=None):
        record = self.get_object()
        result = merge_undo(workspace=self.workspace, merge_id=record.pk, actor=self.actor)
        found = user_selectors.user_list(self.workspace).in_bulk(
            [u.pk for u in (result.restored, result.survivor) if u is not None]
        )
        data = {
            "merge": result.record,
            "restored": found.get(result.record.absorbed_id),
            "survivor": found.get(result.record.survivor_key),
            "already_undone": result.already_undone,
        }
        return Response(s.MergeUndoSerializer(data, context=self.get_serializer_context()).data)


@extend_schema_view(
    list=extend_schema(
        summary="The audit log, newest first",
        description=(
            "Every admin action (feature, rule, user, merge, CSV apply, key and void changes) with "
            "its actor (`api-key:<prefix>`, `user:<username>`, `segment` or `cli`), the object and a "
            "before/after summary. Written in the same transaction as the action."
        ),
        parameters=[s.AuditFilterSerializer],
    )
)
class AuditViewSet(mixins.ListModelMixin, WorkspaceViewSet):
    model = AuditEntry
    serializer_class = s.AuditEntrySerializer

    def scope(self, entries):
        filters = self.query(s.AuditFilterSerializer)
        return audit_entries(self.workspace, entries=entries, **filters)


@extend_schema_view(
    list=extend_schema(
        summary="List suppressed userIds",
        description="The userIds of deleted users: messages naming one are answered `suppressed` and not stored.",
        parameters=[s.SuppressionFilterSerializer],
    ),
    destroy=extend_schema(
        summary="Lift a suppression",
        description=(
            "Messages naming the userId are stored again (an identify creates a new user). "
            "Recorded in the audit log (`suppression.delete`)."
        ),
    ),
)
class SuppressionViewSet(mixins.ListModelMixin, mixins.DestroyModelMixin, WorkspaceViewSet):
    model = Suppression
    serializer_class = s.SuppressionSerializer

    def scope(self, suppressions):
        filters = self.query(s.SuppressionFilterSerializer) if self.action == "list" else {}
        if "user_id" in filters:
            suppressions = suppressions.filter(user_id=filters["user_id"])
        return suppressions.order_by("-created_at", "-pk")

    def perform_destroy(self, suppression):
        lift_suppression(workspace=self.workspace, suppression_pk=suppression.pk, actor=self.actor)


class WorkspaceSettingsViewSet(WorkspaceViewSet):
    """The calling key's own workspace: no id in the path, no other workspace reachable."""

    serializer_class = s.WorkspaceSettingsSerializer

    def _answer(self, workspace) -> Response:
        counts = feature_selectors.anonymous_event_counts(workspace)
        data = {
            "id": workspace.pk,
            **workspace_settings(workspace),
            "anonymous_pending": counts["pending"],
            "anonymous_expired": counts["expired"],
        }
        return Response(s.WorkspaceSettingsSerializer(data).data)

    @extend_schema(summary="The workspace's settings")
    def retrieve(self, request):
        # Read afresh: the request's workspace may come from the key cache, a few seconds old.
        return self._answer(Workspace.objects.get(pk=self.workspace.pk))

    @extend_schema(
        summary="Change the workspace's settings",
        description="Recorded in the audit log (`workspace.update`) when something changed.",
        request=s.WorkspaceSettingsUpdateSerializer,
        responses=s.WorkspaceSettingsSerializer,
        examples=[OpenApiExample("Hold anonymous events", value={"anonymous_events": "hold"}, request_only=True)],
    )
    def partial_update(self, request):
        changes = self.body(s.WorkspaceSettingsUpdateSerializer)
        return self._answer(workspace_settings_update(workspace=self.workspace, changes=changes, actor=self.actor))


# --- Webhooks ----------------------------------------------------------------------------

WEBHOOK_REQUEST = {
    "url": "https://example.com/kana/webhooks",
    "events": ["usage.threshold_reached", "usage.limit_reached", "subscription.updated", "user.merged"],
    "thresholds": [0.8, 1.0],
}
WEBHOOK_EXAMPLE = {
    "id": 3,
    **WEBHOOK_REQUEST,
    "active": True,
    "created_at": "2025-02-01T08:30:00Z",
    "updated_at": "2025-02-01T08:30:00Z",
}
DELIVERY_EXAMPLE = {
    "id": 120,
    "event": {
        "id": 88,
        "type": "user.merged",
        "created": "2025-02-01T08:30:00Z",
        "data": {
            "merge_id": 9,
            "survivor_id": 42,
            "absorbed_id": 57,
            "absorbed_user_ids": ["anon-7f3a"],
            "reason": "admin",
        },
    },
    "status": "delivered",
    "attempt_count": 2,
    "next_attempt_at": None,
    "last_status_code": 200,
    "last_error": "",
    "created_at": "2025-02-01T08:30:00Z",
    "attempts": [
        {
            "number": 1,
            "attempted_at": "2025-02-01T08:30:00Z",
            "status_code": 500,
            "response": "upstream busy",
            "error": "",
            "duration_ms": 41,
        },
        {
            "number": 2,
            "attempted_at": "2025-02-01T08:30:31Z",
            "status_code": 200,
            "response": "ok",
            "error": "",
            "duration_ms": 12,
        },
    ],
}


@extend_schema_view(
    list=extend_schema(
        summary="List webhook endpoints",
        examples=[OpenApiExample("Endpoints", value=page_of(WEBHOOK_EXAMPLE), response_only=True)],
    ),
    retrieve=extend_schema(summary="Get a webhook endpoint (without its secret)"),
    destroy=extend_schema(summary="Delete a webhook endpoint and its deliveries"),
)
class WebhookViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, WorkspaceViewSet):
    model = WebhookEndpoint
    serializer_class = s.WebhookSerializer
    http_method_names = ["get", "patch", "post", "delete", "head", "options"]

    def scope(self, endpoints):
        return endpoints.order_by("-created_at", "-pk")

    @extend_schema(
        summary="Create a webhook endpoint",
        description=(
            "Answers the endpoint with its `secret`, which signs every delivery and is never shown again. "
            'Each delivery POSTs `{"id", "type", "created", "data"}` with '
            '`Kana-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`; anything but a 2xx '
            "is retried with exponential backoff for 24 hours. `url` must be http(s) (else 400 `invalid_url`)."
        ),
        request=s.WebhookCreateSerializer,
        responses={201: s.WebhookCreatedSerializer},
        examples=[
            OpenApiExample("Every event", value=WEBHOOK_REQUEST, request_only=True),
            OpenApiExample(
                "Created", value={**WEBHOOK_EXAMPLE, "secret": "whsec_3q2-7wEXAMPLEexampleEXAMPLE"}, response_only=True
            ),
        ],
    )
    def create(self, request):
        endpoint = webhook_create(workspace=self.workspace, actor=self.actor, **self.body(s.WebhookCreateSerializer))
        return Response(s.WebhookCreatedSerializer(endpoint).data, status=201)

    @extend_schema(
        summary="Change a webhook endpoint's URL, events, thresholds or active flag",
        request=s.WebhookUpdateSerializer,
        responses=s.WebhookSerializer,
        examples=[OpenApiExample("Pause it", value={"active": False}, request_only=True)],
    )
    def partial_update(self, request, pk=None):
        endpoint = webhook_update(
            workspace=self.workspace,
            endpoint=self.get_object(),
            actor=self.actor,
            **self.body(s.WebhookUpdateSerializer),
        )
        return Response(self.get_serializer(endpoint).data)

    def perform_destroy(self, endpoint):
        webhook_delete(workspace=self.workspace, endpoint=endpoint, actor=self.actor)

    @extend_schema(
        summary="Rotate a webhook endpoint's secret",
        description=(
            "Answers the endpoint with its new `secret`, shown only here. For `previous_valid_seconds` "
            "(default a day) deliveries carry two signatures, `Kana-Signature: t=<unix>,v1=<new>,v1=<old>`, "
            "so the receiver can switch without refusing any; `0` retires the old secret at once. "
            "Recorded in the audit log (`webhook.update`, never a secret)."
        ),
        request=s.WebhookRotateSecretSerializer,
        responses={200: s.WebhookCreatedSerializer},
        examples=[OpenApiExample("Retire a leaked secret now", value={"previous_valid_seconds": 0}, request_only=True)],
    )
    @action(detail=True, methods=["post"], url_path="rotate-secret")
    def rotate_secret(self, request, pk=None):
        endpoint = webhook_rotate_secret(
            workspace=self.workspace,
            endpoint=self.get_object(),
            actor=self.actor,
            **self.body(s.WebhookRotateSecretSerializer),
        )
        return Response(s.WebhookCreatedSerializer(endpoint).data)

    @extend_schema(
        summary="An endpoint's deliveries, newest first, with every attempt and its response",
        responses=s.WebhookDeliverySerializer(many=True),
        examples=[
            OpenApiExample("Delivered at the second attempt", value=page_of(DELIVERY_EXAMPLE), response_only=True)
        ],
    )
    @action(detail=True, methods=["get"])
    def deliveries(self, request, pk=None):
        deliveries = webhook_selectors.delivery_list(self.workspace, endpoint=self.get_object())
        return self.paginated(deliveries, s.WebhookDeliverySerializer)
