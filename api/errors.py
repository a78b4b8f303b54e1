"""API errors: domain errors as 400s and JSON 404s for unknown API paths."""

from django.http import JsonResponse
from django.views import defaults
from rest_framework.exceptions import APIException

from kana import errors

# The service errors the API reports with their own code, message and field.
DOMAIN_ERRORS = (errors.DomainError,)


class DomainError(APIException):
    """A request the services refused; ``api.auth.exception_handler`` renders it."""

    status_code = 400
    default_code = "invalid_request"

    def __init__(self, *, code: str, message: str, field: str | None = None):
        super().__init__(detail=message)
        # The attributes the project's exception handler reads.
        self.kana_code, self.kana_field = code, field

    @classmethod
    def from_service(cls, error: errors.DomainError) -> "DomainError":
        refusal = cls(code=error.code, message=error.message, field=error.field)
        refusal.status_code = error.status
        return refusal


def not_found(request, exception=None):
    """Django's 404 for a path no URL matches: JSON under /api/, the usual page elsewhere.

    An API client asking for ``/api/v1/users/abc`` gets the same body as for an unknown id.
    """
    if request.path.startswith("/api/"):
        return JsonResponse({"code": "not_found", "message": "no such API path or object"}, status=404)
    return defaults.page_not_found(request, exception)
