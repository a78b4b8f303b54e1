from django.apps import AppConfig


class EntitlementsConfig(AppConfig):
    name = "entitlements"

    def ready(self):
        # The receivers (a merged user's subscriptions follow it) and the tasks (reservation
        # sweep, threshold crossings), registered so they can be found by name.
        from . import receivers, tasks  # noqa: F401
