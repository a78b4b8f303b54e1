"""REST API authentication by API key, tenant permission and the error format."""

from rest_framework import exceptions, permissions
from rest_framework.authentication import BaseAuthentication

from kana.errors import error_body
from kana.http_errors import STATUS_CODES
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
        found = workspace_for_authorization(request.headers.get("Authorization", ""))
        if found is None:
            return None
        request.workspace, key = found
        return WorkspacePrincipal(request.workspace), key

    def authenticate_header(self, request):
        return AUTHENTICATE_HEADER


# The WWW-Authenticate of a 401: how to authenticate.
AUTHENTICATE_HEADER = 'Bearer realm="kana"'


def workspace_for_authorization(header: str):
    """``(workspace, key)`` of the key an Authorization header carries; None without a header
    (DRF then answers 401 ``not_authenticated``); AuthenticationFailed for a key Kana does not
    know. The DRF views (``ApiKeyAuthentication``) and the lean front (``api.lean``) both ask it."""
    if not header:
        return None
    key = api_key_from_authorization(header)
    workspace = workspace_for_api_key(key) if key else None
    if workspace is None:
        raise exceptions.AuthenticationFailed("unknown or revoked API key")
    return workspace, key


class HasWorkspace(permissions.BasePermission):
    def has_permission(self, request, view):
        return getattr(request, "workspace", None) is not None


def exception_handler(exc, context):
    """Every API error in the one envelope, ``{"code", "message", "field"?}`` (plus ``errors``
    for forms)."""
    # Imported at call time: rest_framework.views reads the authentication setting while it
    # is being imported, which imports this module; a module-level import would be circular
    # whenever this module is imported first (api.lean, before any DRF view).
    from rest_framework import views as drf_views

    response = drf_views.exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    code = getattr(exc, "kana_code", None) or STATUS_CODES.get(response.status_code, ("error",))[0]
    field, extra = None, {}
    if isinstance(exc, exceptions.AuthenticationFailed | exceptions.NotAuthenticated):
        response.status_code = 401
        code = "not_authenticated" if isinstance(exc, exceptions.NotAuthenticated) else "invalid_api_key"
    if isinstance(data, dict) and "detail" in data:
        message = str(data["detail"])
    elif isinstance(data, dict):
        name, messages = next(iter(data.items()))
        first = messages[0] if isinstance(messages, list) and messages else messages
        message = f"{name}: {first}" if name != "non_field_errors" else str(first)
        field = name if name != "non_field_errors" else None
        extra["errors"] = data
    elif isinstance(data, list):
        message = str(data[0]) if data else "invalid request"
    else:
        message = str(data)
    response.data = error_body(code, message, getattr(exc, "kana_field", None) or field, **extra)
    return response
