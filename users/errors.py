"""The identity layer's refusals."""

from kana.errors import DomainError


class IdentityError(DomainError):
    """A request the identity rules refuse (an unknown user, an ambiguous email, ...)."""
