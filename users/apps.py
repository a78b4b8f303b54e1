from django.apps import AppConfig


class UsersConfig(AppConfig):
    name = "users"
    verbose_name = "Kana users"
    # Its tasks (users/tasks.py) are imported by a worker at start and by ``kana.jobs`` when
    # an import job is sent, not here: Django's start does not import Celery.
