from django.apps import AppConfig


class FeaturesConfig(AppConfig):
    name = "features"

    def ready(self):
        # Models cannot be imported before ready(). The ledger connects its receivers (a merge
        # in users moves the absorbed user's events and usage through it); the tasks register
        # with Celery, so a job can be sent by name from any process (kana.jobs).
        from . import ledger, tasks  # noqa: F401
