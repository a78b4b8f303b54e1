from django.apps import AppConfig


class UsersConfig(AppConfig):
    name = "users"
    verbose_name = "Kana users"

    def ready(self):
        # The tasks register with Celery, so an import job can be sent by name (kana.jobs).
        from . import tasks  # noqa: F401
