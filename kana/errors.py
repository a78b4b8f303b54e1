"""The one error type that services raise and every edge reports in one shape.

A service refuses a request by raising a ``DomainError`` (or a subclass naming its domain):
``code`` is stable and machine-readable, ``message`` is for people, ``field`` points at the
input at fault, ``status`` is the HTTP status an edge answers with. Each edge renders it as
``{"code", "message", "field"?}`` through ``error_body``; a CSV import lists it per row.
"""

from typing import Any


class DomainError(Exception):
    status = 400

    def __init__(self, code: str, message: str, field: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field
        if status is not None:
            self.status = status

    def as_dict(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.field)


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    """The error envelope of every edge: ``{"code", "message", "field"?}`` plus extras."""
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    body.update(extra)
    return body
