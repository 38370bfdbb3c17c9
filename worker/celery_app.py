"""The Celery application, configured from ``celeryconfig`` (a view of the settings)."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker import logs
from worker.settings import get_settings

app = Celery("callq")
app.config_from_object("celeryconfig")
app.conf.include = ["worker.tasks"]


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    s = get_settings()
    logs.configure_logging(s.log_level, s.log_json)


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, args: Any = (), **_: Any) -> None:
    logs.clear()
    logs.bind(task_id=task_id, task=getattr(task, "name", None))
    if args and task is not None and task.name in _ASSIGNMENT_TASKS:
        logs.bind(assignment_id=args[0])


@signals.task_postrun.connect
def _clear_task(**_: Any) -> None:
    logs.clear()


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    from worker import runtime

    runtime.reset()


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    from worker import runtime

    runtime.reset()


@signals.beat_init.connect
def _start_listener(sender: Any = None, **_: Any) -> None:
    s = get_settings()
    if s.listen_enabled and s.database_url:
        from worker.listener import start_listener

        start_listener(s.database_url)


_ASSIGNMENT_TASKS = {"callq.dispatch", "callq.track", "callq.reconcile"}
