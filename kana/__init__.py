# The Celery app is ``kana.celery`` (``celery -A kana`` finds it there). It is not imported
# here, as Celery's Django example does, so that Django's start (every command, every web
# worker) does not import Celery; ``kana.jobs`` imports it where a task is defined or sent.
