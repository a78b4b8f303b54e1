"""``/api/v1/`` routes.

Object ids in paths are digits only (feature ids excepted: they are feature keys), so the
router's ``users/{id}`` never takes ``users/export`` or ``users/import``: the CSV endpoints can
be routed next to these, before or after them, in ``kana/urls.py``.
"""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import entitlement_views, views

router = SimpleRouter(trailing_slash=False)
router.register("users", views.UserViewSet, basename="user")
router.register("features", views.FeatureViewSet, basename="feature")
router.register("rules", views.RuleViewSet, basename="rule")
router.register("events", views.EventViewSet, basename="event")
router.register("usage", views.UsageViewSet, basename="usage")
router.register("merges", views.MergeViewSet, basename="merge")
router.register("audit", views.AuditViewSet, basename="audit")
router.register("usage/records", entitlement_views.UsageRecordViewSet, basename="usage-record")
router.register("packages", entitlement_views.PackageViewSet, basename="package")
router.register("subscriptions", entitlement_views.SubscriptionViewSet, basename="subscription")
router.register("entitlements/reservations", entitlement_views.ReservationViewSet, basename="reservation")
router.register("entitlements", entitlement_views.EntitlementViewSet, basename="entitlement")
router.register("webhooks", views.WebhookViewSet, basename="webhook")
router.register("suppressions", views.SuppressionViewSet, basename="suppression")

app_name = "api"
urlpatterns = [
    path(
        "workspace",
        views.WorkspaceSettingsViewSet.as_view({"get": "retrieve", "patch": "partial_update"}),
        name="workspace",
    ),
    *router.urls,
]
