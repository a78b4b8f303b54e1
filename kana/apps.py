from django.apps import AppConfig


class KanaConfig(AppConfig):
    name = "kana"
