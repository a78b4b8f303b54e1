from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webhooks"

    def ready(self):
        # The receivers connect to kana.signals.notification and users.signals.user_absorbed;
        # the tasks register with Celery, so a delivery can be sent by name (kana.jobs).
        from . import receivers, tasks  # noqa: F401
