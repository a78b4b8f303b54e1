"""API errors: the services' domain errors with their own status (HTTP errors in general: ``kana.http_errors``)."""

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
