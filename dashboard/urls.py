from django.contrib.auth import views as auth_views
from django.urls import path

from .views import audit, csv, duplicates, entitlements, packages, rules, segment, users, workspace

app_name = "dashboard"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="dashboard/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard:login"), name="logout"),
    path("", segment.segment, name="segment"),
    path("workspaces/", segment.workspaces, name="workspaces"),
    path("keys/", segment.key_create, name="key_create"),
    path("keys/<int:pk>/revoke/", segment.key_revoke, name="key_revoke"),
    path("users/", users.user_list_page, name="users"),
    path("users/<int:pk>/", users.user_detail, name="user"),
    path("users/<int:pk>/delete/", users.user_delete, name="user_delete"),
    path("users/<int:pk>/events/<int:event_id>/void/", users.event_void_page, name="event_void"),
    path("users/<int:pk>/merges/<int:merge_pk>/undo/", users.user_merge_undo, name="user_merge_undo"),
    path("users/<int:pk>/entitlements/", entitlements.user_entitlements, name="user_entitlements"),
    path("users/<int:pk>/subscriptions/", entitlements.subscribe, name="subscribe"),
    path(
        "users/<int:pk>/subscriptions/<int:subscription_pk>/",
        entitlements.subscription_change,
        name="subscription_change",
    ),
    path("packages/", packages.packages, name="packages"),
    path("packages/<int:pk>/", packages.package_detail, name="package"),
    path("packages/<int:pk>/status/", packages.package_status, name="package_status"),
    path("duplicates/", duplicates.duplicates, name="duplicates"),
    path("duplicates/preview/", duplicates.merge_preview_page, name="merge_preview"),
    path("duplicates/merge/", duplicates.merge, name="merge"),
    path("features/", rules.features, name="features"),
    path("rules/", rules.rules, name="rules"),
    path("rules/new/", rules.rule_new, name="rule_new"),
    path("rules/preview/", rules.rule_preview, name="rule_preview"),
    path("rules/<int:pk>/progress/", rules.rule_progress, name="rule_progress"),
    path("rules/<int:pk>/active/", rules.rule_toggle, name="rule_toggle"),
    path("unmapped/", rules.unmapped, name="unmapped"),
    path("csv/", csv.csv_page, name="csv"),
    path("csv/export/", csv.csv_export, name="csv_export"),
    path("csv/import/", csv.csv_import, name="csv_import"),
    path("csv/imports/<int:pk>/", csv.csv_job, name="csv_job"),
    path("csv/imports/<int:pk>/progress/", csv.csv_job_progress, name="csv_job_progress"),
    path("csv/imports/<int:pk>/report/", csv.csv_job_report, name="csv_job_report"),
    path("csv/imports/<int:pk>/apply/", csv.csv_job_apply, name="csv_job_apply"),
    path("audit/", audit.audit_log, name="audit"),
    path("settings/", workspace.workspace_settings_page, name="settings"),
]
