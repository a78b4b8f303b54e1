from django.apps import AppConfig


class FeaturesConfig(AppConfig):
    name = "features"

    def ready(self):
        # Importing the ledger connects its receivers: a merge in users moves the absorbed
        # user's events and usage through it. (Models cannot be imported before ready().)
        from . import ledger  # noqa: F401
