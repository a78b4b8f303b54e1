"""REST endpoints of entitlements (SPEC §11): packages, subscriptions, checks, usage records,
consumes and reservations. Each translates HTTP to one ``entitlements`` call and back."""

from django.utils import timezone
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins
from rest_framework.decorators import action
from rest_framework.response import Response

from entitlements import access
from entitlements.models import Package, Reservation, Subscription
from entitlements.services import (
    EntitlementError,
    PackageFeatureSpec,
    package_create,
    package_delete,
    package_update,
    subscription_create,
    subscription_update,
)
from users.models import EndUser, Group
from users.selectors import user_pk_for

from . import entitlement_serializers as s
from .base import WorkspaceViewSet
from .entitlement_requests import check_answer, consume_answer
from .schema import ErrorSerializer

CONFLICT = OpenApiResponse(ErrorSerializer, description="The request conflicts with the current state: see `code`.")

PACKAGE_EXAMPLE = {
    "id": "pro-plan",
    "name": "Pro",
    "is_addon": False,
    "status": "published",
    "metadata": {"stripe_price": "price_123"},
    "features": [
        {"feature": "messages", "limit": 500, "overage_enabled": False, "reset_period": "month"},
        {"feature": "sso", "limit": None, "overage_enabled": False, "reset_period": "never"},
    ],
    "created_at": "2025-01-05T10:00:00Z",
    "updated_at": "2025-01-05T10:00:00Z",
}
CHECK_EXAMPLE = {
    "access": True,
    "reason": "within_limit",
    "message": "within the period's budget",
    "consumption": {"used": 120, "budget": 500, "remaining": 380, "held": 0, "overage_enabled": False},
    "period": {"start": "2025-03-31T10:00:00Z", "end": "2025-04-30T10:00:00Z"},
}


def _feature_specs(features: list[dict]) -> list[PackageFeatureSpec]:
    return [
        PackageFeatureSpec(
            feature_key=f["feature"],
            limit=f.get("limit"),
            overage_enabled=f.get("overage_enabled", False),
            reset_period=f.get("reset_period", "month"),
        )
        for f in features
    ]


@extend_schema_view(
    list=extend_schema(summary="List packages"),
    retrieve=extend_schema(summary="Get a package by its id"),
    destroy=extend_schema(summary="Delete a draft package nobody subscribed to", responses={204: None, 409: CONFLICT}),
)
class PackageViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, WorkspaceViewSet):
    model = Package
    serializer_class = s.PackageSerializer
    lookup_field = "key"
    lookup_url_kwarg = "id"
    lookup_value_regex = "[A-Za-z0-9_.:-]{1,100}"
    http_method_names = ["get", "patch", "post", "delete", "head", "options"]

    def scope(self, packages):
        return packages.prefetch_related("features__feature").order_by("key")

    @extend_schema(
        summary="Create a package",
        description=(
            "A draft may be edited freely; a published package only changes its name, metadata and status "
            "(to archived). BINARY features carry no limit (null)."
        ),
        request=s.PackageCreateSerializer,
        responses={201: s.PackageSerializer, 409: CONFLICT},
        examples=[OpenApiExample("Pro plan", value={**PACKAGE_EXAMPLE, "status": "draft"}, request_only=True)],
    )
    def create(self, request):
        body = self.body(s.PackageCreateSerializer)
        package = package_create(
            workspace=self.workspace,
            key=body["id"],
            name=body.get("name", ""),
            is_addon=body["is_addon"],
            status=body["status"],
            metadata=body.get("metadata"),
            features=_feature_specs(body.get("features", [])),
            actor=self.actor,
        )
        return Response(self.get_serializer(self.get_queryset().get(pk=package.pk)).data, status=201)

    @extend_schema(
        summary="Change a package",
        request=s.PackageUpdateSerializer,
        responses={200: s.PackageSerializer, 409: CONFLICT},
        examples=[OpenApiExample("Publish", value={"status": "published"}, request_only=True)],
    )
    def partial_update(self, request, id=None):
        # Not partial: every field is optional already, and a feature row given must be whole
        # (partial would reach the nested rows and let one without its feature through).
        changes = dict(self.body(s.PackageUpdateSerializer))
        if "features" in changes:
            changes["features"] = _feature_specs(changes["features"])
        package = package_update(workspace=self.workspace, package=self.get_object(), changes=changes, actor=self.actor)
        return Response(self.get_serializer(self.get_queryset().get(pk=package.pk)).data)

    def destroy(self, request, id=None):
        package_delete(workspace=self.workspace, package=self.get_object(), actor=self.actor)
        return Response(status=204)


@extend_schema_view(
    list=extend_schema(summary="List subscriptions", parameters=[s.SubscriptionFilterSerializer]),
    retrieve=extend_schema(summary="Get a subscription"),
)
class SubscriptionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, WorkspaceViewSet):
    model = Subscription
    serializer_class = s.SubscriptionSerializer
    http_method_names = ["get", "patch", "post", "head", "options"]

    def get_serializer_context(self):
        return {**super().get_serializer_context(), "now": timezone.now()}

    def scope(self, subscriptions):
        subscriptions = subscriptions.select_related("user", "group", "package").order_by("-created_at", "-pk")
        if self.action != "list":
            return subscriptions
        filters = self.query(s.SubscriptionFilterSerializer)
        if "user_id" in filters:
            user_pk = user_pk_for(self.workspace, filters["user_id"])
            subscriptions = subscriptions.filter(user_id=user_pk) if user_pk else subscriptions.none()
        if "group_id" in filters:
            subscriptions = subscriptions.filter(group__group_id=filters["group_id"])
        if "status" in filters:
            subscriptions = subscriptions.filter(status=filters["status"])
        return subscriptions

    def _package(self, key: str) -> Package:
        package = Package.objects.for_workspace(self.workspace).filter(key=key).first()
        if package is None:
            raise EntitlementError("unknown_package", f"no package {key!r}", "package", status=404)
        return package

    @extend_schema(
        summary="Subscribe a user or a group to a package",
        description=(
            "A subject has at most one live base package (409 `multiple_base_packages`) and any number of "
            "add-ons, which need a live base package (409 `addon_without_base`). Periods are counted from "
            "`started_at`."
        ),
        request=s.SubscriptionCreateSerializer,
        responses={201: s.SubscriptionSerializer, 409: CONFLICT},
        examples=[
            OpenApiExample("Pro for a user", value={"user_id": "u_123", "package": "pro-plan"}, request_only=True)
        ],
    )
    def create(self, request):
        body = self.body(s.SubscriptionCreateSerializer)
        user = group = None
        if "user_id" in body:
            user_pk = user_pk_for(self.workspace, body["user_id"])
            if user_pk is None:
                raise EntitlementError("unknown_user", f"no user {body['user_id']!r}", "user_id", status=404)
            user = EndUser.objects.for_workspace(self.workspace).get(pk=user_pk)
        else:
            group = Group.objects.for_workspace(self.workspace).filter(group_id=body["group_id"]).first()
            if group is None:
                raise EntitlementError("unknown_group", f"no group {body['group_id']!r}", "group_id", status=404)
        subscription = subscription_create(
            workspace=self.workspace,
            package=self._package(body["package"]),
            user=user,
            group=group,
            status=body["status"],
            started_at=body.get("started_at"),
            actor=self.actor,
        )
        return Response(self.get_serializer(self.get_queryset().get(pk=subscription.pk)).data, status=201)

    @extend_schema(
        summary="Change plan or status",
        description="Another base package keeps the period anchor (`started_at`).",
        request=s.SubscriptionUpdateSerializer,
        responses={200: s.SubscriptionSerializer, 409: CONFLICT},
    )
    def partial_update(self, request, pk=None):
        body = self.body(s.SubscriptionUpdateSerializer, partial=True)
        subscription = subscription_update(
            workspace=self.workspace,
            subscription=self.get_object(),
            package=self._package(body["package"]) if "package" in body else None,
            status=body.get("status"),
            actor=self.actor,
        )
        return Response(self.get_serializer(self.get_queryset().get(pk=subscription.pk)).data)


class EntitlementViewSet(WorkspaceViewSet):
    """Decisions: may this user or group use this feature now, and how much is used."""

    model = Subscription

    @extend_schema(
        summary="May this user (or group) use this feature now?",
        description=(
            "An unknown user, group or feature is an answer (`access: false`), not a 404. `delta` is how much "
            "the caller is about to use (default 1). Reasons: binary_access, within_limit, overage_enabled, "
            "limit_reached, no_subscription, subscription_inactive, feature_not_in_package, unknown_user, "
            "unknown_group, unknown_feature."
        ),
        parameters=[s.CheckQuerySerializer],
        responses=s.CheckSerializer,
        examples=[OpenApiExample("Within the budget", value=CHECK_EXAMPLE, response_only=True)],
    )
    @action(detail=False, methods=["get"])
    def check(self, request):
        return Response(check_answer(self.workspace, request.query_params.dict()))

    @extend_schema(
        summary="Usage of a feature: this period and the ones before",
        parameters=[s.UsageQuerySerializer],
        responses=s.UsageHistorySerializer,
    )
    @action(detail=False, methods=["get"])
    def usage(self, request):
        query = self.query(s.UsageQuerySerializer)
        history = access.usage_history(
            self.workspace,
            feature_key=query["feature"],
            user_id=query.get("user_id"),
            group_id=query.get("group_id"),
            past=query.get("past", 6),
        )
        return Response(history)

    @extend_schema(
        summary="Check and record in one atomic step",
        description=(
            "With a hard limit it never overspends, whatever the concurrency: a refusal is HTTP 200 with "
            "`recorded: false` and the reason. The same `idempotency_key` again answers the first answer."
        ),
        request=s.ConsumeSerializer,
        responses={200: s.ConsumeAnswerSerializer, 409: CONFLICT},
        examples=[
            OpenApiExample(
                "One message",
                value={"user_id": "u_123", "feature": "messages", "delta": 1, "idempotency_key": "k1"},
                request_only=True,
            )
        ],
    )
    @action(detail=False, methods=["post"])
    def consume(self, request):
        return Response(consume_answer(self.workspace, request.data))


class UsageRecordViewSet(WorkspaceViewSet):
    model = Subscription

    @extend_schema(
        summary="Record usage (add, or set the period's used)",
        description=(
            "`set` makes the current period's used equal to `delta` (the difference is recorded). The "
            "`idempotency_key` is unique per workspace forever and shares its namespace with Segment's "
            "messageIds: the same key again answers 200 with the first answer and records nothing."
        ),
        request=s.RecordSerializer,
        responses={201: s.RecordAnswerSerializer, 200: s.RecordAnswerSerializer, 409: CONFLICT},
    )
    def create(self, request):
        body = self.body(s.RecordSerializer)
        answer, replayed = access.record_usage(
            self.workspace,
            user_id=body["user_id"],
            feature_key=body["feature"],
            delta=body["delta"],
            action=body["action"],
            idempotency_key=body["idempotency_key"],
            occurred_at=body.get("occurred_at"),
        )
        return Response(answer, status=200 if replayed else 201)


@extend_schema_view(retrieve=extend_schema(summary="Get a reservation"))
class ReservationViewSet(mixins.RetrieveModelMixin, WorkspaceViewSet):
    model = Reservation
    serializer_class = s.ReservationSerializer

    def scope(self, reservations):
        return reservations.select_related("user", "feature")

    def _answer(self, reservation: Reservation, status: int = 200) -> Response:
        return Response(self.get_serializer(self.get_queryset().get(pk=reservation.pk)).data, status=status)

    @extend_schema(
        summary="Hold part of a budget for a long action",
        description=(
            "Held amounts count against the budget for checks, consumes and other holds until committed, "
            "released or expired. Refused with 409 and the decision's reason (`limit_reached`, …). The same "
            "`idempotency_key` again answers the same reservation."
        ),
        request=s.ReservationCreateSerializer,
        responses={201: s.ReservationSerializer, 200: s.ReservationSerializer, 409: CONFLICT},
    )
    def create(self, request):
        body = self.body(s.ReservationCreateSerializer)
        reservation, created = access.reservation_create(
            self.workspace,
            user_id=body["user_id"],
            feature_key=body["feature"],
            amount=body["amount"],
            ttl_seconds=body["ttl_seconds"],
            idempotency_key=body["idempotency_key"],
        )
        return self._answer(reservation, 201 if created else 200)

    @extend_schema(
        summary="Commit a hold: record its usage (idempotent)",
        request=s.ReservationCommitSerializer,
        responses={200: s.ReservationSerializer, 409: CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def commit(self, request, pk=None):
        amount = self.body(s.ReservationCommitSerializer).get("amount")
        reservation = access.reservation_commit(self.workspace, reservation_id=self.get_object().pk, amount=amount)
        return self._answer(reservation)

    @extend_schema(
        summary="Release a hold (idempotent)", request=None, responses={200: s.ReservationSerializer, 409: CONFLICT}
    )
    @action(detail=True, methods=["post"])
    def release(self, request, pk=None):
        reservation = access.reservation_release(self.workspace, reservation_id=self.get_object().pk)
        return self._answer(reservation)
