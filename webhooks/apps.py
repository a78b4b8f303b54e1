from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webhooks"

    def ready(self):
        # The receivers connect to kana.signals.notification and users.signals.user_absorbed.
        # The tasks are imported by a worker at start and by kana.jobs when a delivery is
        # sent, not here.
        from . import receivers  # noqa: F401
