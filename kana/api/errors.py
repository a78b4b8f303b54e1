"""API errors: the services' domain errors as 400s (HTTP errors in general: ``kana.http_errors``)."""

from rest_framework.exceptions import APIException

from features.services import FeatureError
from users.profile import InvalidProfileValue
from users.services import IdentityError

# The service errors the API reports as 400 with their own code, message and field.
DOMAIN_ERRORS = (IdentityError, FeatureError, InvalidProfileValue)


class DomainError(APIException):
    """A request the services refused; ``kana.api_auth.exception_handler`` renders it."""

    status_code = 400
    default_code = "invalid_request"

    def __init__(self, *, code: str, message: str, field: str | None = None):
        super().__init__(detail=message)
        # The attributes the project's exception handler reads.
        self.kana_code, self.kana_field = code, field

    @classmethod
    def from_service(cls, error: Exception) -> "DomainError":
        return cls(code=error.code, message=error.message, field=error.field)
