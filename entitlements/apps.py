from django.apps import AppConfig


class EntitlementsConfig(AppConfig):
    name = "entitlements"

    def ready(self):
        # The receivers: a merged user's subscriptions follow it. The tasks (reservation sweep,
        # threshold crossings) are beat's, imported by a worker at start, not here.
        from . import receivers  # noqa: F401
