from kana.errors import DomainError


class FeatureError(DomainError):
    """A feature or rule change the services refuse."""
