"""REST API authentication by API key, tenant permission and the error format."""

from rest_framework import exceptions, permissions
from rest_framework import views as drf_views
from rest_framework.authentication import BaseAuthentication

from kana.request_auth import api_key_from_authorization
from kana.services import workspace_for_api_key


class WorkspacePrincipal:
    """The caller of an API request: a workspace, authenticated by one of its keys."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, workspace):
        self.workspace = workspace

    def __str__(self) -> str:
        return f"api-key:{self.workspace.pk}"


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer <key>``, ``Basic base64(<key>:)`` or the bare key."""

    def authenticate(self, request):
        header = request.headers.get("Authorization", "")
        if not header:
            return None
        key = api_key_from_authorization(header)
        workspace = workspace_for_api_key(key) if key else None
        if workspace is None:
            raise exceptions.AuthenticationFailed("unknown or revoked API key")
        request.workspace = workspace
        return WorkspacePrincipal(workspace), key

    def authenticate_header(self, request):
        return 'Bearer realm="kana"'


class HasWorkspace(permissions.BasePermission):
    def has_permission(self, request, view):
        return getattr(request, "workspace", None) is not None


_CODES = {
    400: "invalid_request",
    401: "not_authenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    415: "unsupported_media_type",
    429: "throttled",
}


def exception_handler(exc, context):
    """Every API error as ``{"code", "message", "field"?}`` (plus ``errors`` for forms)."""
    # Looked up at call time: rest_framework.views reads the authentication setting while it
    # is being imported, which imports this module; a module-level import would be circular.
    response = drf_views.exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    body = {"code": getattr(exc, "kana_code", None) or _CODES.get(response.status_code, "error")}
    if isinstance(exc, exceptions.AuthenticationFailed | exceptions.NotAuthenticated):
        response.status_code = 401
        body["code"] = "not_authenticated" if isinstance(exc, exceptions.NotAuthenticated) else "invalid_api_key"
    if isinstance(data, dict) and "detail" in data:
        body["message"] = str(data["detail"])
    elif isinstance(data, dict):
        field, messages = next(iter(data.items()))
        first = messages[0] if isinstance(messages, list) and messages else messages
        body["message"] = f"{field}: {first}" if field != "non_field_errors" else str(first)
        if field != "non_field_errors":
            body["field"] = field
        body["errors"] = data
    elif isinstance(data, list):
        body["message"] = str(data[0]) if data else "invalid request"
    else:
        body["message"] = str(data)
    if getattr(exc, "kana_field", None):
        body["field"] = exc.kana_field
    response.data = body
    return response
