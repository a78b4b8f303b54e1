from django.apps import AppConfig


class FeaturesConfig(AppConfig):
    name = "features"

    def ready(self):
        # Models cannot be imported before ready(). The ledger connects its receivers (a merge
        # in users moves the absorbed user's events and usage through it). The tasks are
        # imported by a worker at start and by kana.jobs when a job is sent, not here.
        from . import ledger  # noqa: F401
