"""The Celery application, configured from the settings when it is first configured
(``worker.celery_config``), never from a module in the working directory."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from celery import Celery, Task, signals

from worker import logs, runtime
from worker.celery_config import SettingsConfig
from worker.listener import start_listener
from worker.settings import get_settings


def _survive_broker_restart() -> None:
    """Keep the worker alive when Redis restarts while messages are unacknowledged.

    kombu 5.7's Redis transport restores unacknowledged messages while it closes a connection
    that has already failed, finds no connection info and raises AttributeError, which Celery
    treats as unrecoverable: the worker exits (bench/FINDINGS.md #10). Losing those messages is
    harmless here (PostgreSQL holds every call; the reaper and the poll re-create the work), so
    a failed restore is logged and the consumer reconnects instead.
    """
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "_callq_safe", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> None:
        try:
            original(self, client)  # type: ignore[no-untyped-call]
        except Exception as exc:  # the broker is gone: nothing to restore into
            logging.getLogger("callq.worker").warning(
                "broker.restore_unacked_failed error=%s", type(exc).__name__
            )
            self._delivered.clear()

    restore_unacked._callq_safe = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]


class DatabaseError(Exception):
    """A database error as a task may report it: its SQLSTATE and constraint, nothing else."""


class CallqTask(Task):  # type: ignore[misc]
    """Every callq task. A psycopg error leaves the task as its SQLSTATE and constraint name
    only: its message and DETAIL ("Failing row contains (..., +1555...)") never reach
    Celery's log, the result backend or Flower."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except psycopg.Error as exc:
            raise database_error(exc) from None


def database_error(exc: psycopg.Error) -> DatabaseError:
    """The sanitized form of a psycopg error (logged once, as an event with its code)."""
    diag = getattr(exc, "diag", None)
    constraint = getattr(diag, "constraint_name", None) if diag is not None else None
    sqlstate = exc.sqlstate or type(exc).__name__
    logging.getLogger("callq.worker").warning(
        "task.database_error sqlstate=%s constraint=%s", sqlstate, constraint
    )
    return DatabaseError(
        f"SQLSTATE {sqlstate}" + (f" constraint {constraint}" if constraint else "")
    )


_survive_broker_restart()
app = Celery("callq", task_cls=CallqTask)
app.config_from_object(SettingsConfig())


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
    runtime.reset()


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    runtime.reset()


@signals.beat_init.connect
def _start_listener(sender: Any = None, **_: Any) -> None:
    s = get_settings()
    url = s.listen_url()
    if s.listen_enabled and url:
        # By name: the app never imports its tasks module (which imports the app).
        start_listener(url, on_notify=lambda: app.send_task("callq.poll"))
    elif s.listen_enabled and s.database_url:
        logs.get_logger("callq.listener").warning(
            "listener.off", reason="transaction pooler and no CALLQ_LISTEN_DATABASE_URL"
        )


_ASSIGNMENT_TASKS = {"callq.dispatch", "callq.reconcile"}
