"""callq's Celery side: the app, tasks, beat schedule, webhooks and the ``callq`` CLI.

``celery -A worker worker|beat|flower`` finds the app here.
"""

from worker.celery_app import app

__all__ = ["app"]
