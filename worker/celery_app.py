"""The Celery application, configured from the settings when it is first configured
(``worker.celery_config``), never from a module in the working directory."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from celery import Celery, Task, signals

from worker import logs, runtime
from worker.celery_config import SettingsConfig
from worker.listener import LEADER_KEY, TRACKER_KEY, start_listener
from worker.settings import Settings, get_settings


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


def _reuse_redis_clients() -> None:
    """One Redis client object per broker channel instead of one per operation.

    kombu's Redis transport builds a new ``redis.Redis`` for every operation outside the event
    loop's own client: each message a worker receives costs two (the unacked-index write when
    it arrives and the ack), each message sent one, and each construction copies redis-py's
    table of ~170 response callbacks. That was most of an idle worker's CPU between beat's
    ticks (bench/notes/tracking_session4.md). A ``redis.Redis`` over a connection pool is
    thread-safe (each command takes a connection from the pool, each pipeline is its own
    object), so the channel keeps one per pool; a new pool (a reconnect) gets a new client.
    """
    from kombu.transport import redis as kombu_redis

    original: Any = kombu_redis.Channel._create_client
    if getattr(original, "_callq_reused", False):
        return

    def create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get("_callq_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, original(self))
            self.__dict__["_callq_client"] = cached
        return cached[1]

    create_client._callq_reused = True  # type: ignore[attr-defined]
    kombu_redis.Channel._create_client = create_client  # type: ignore[method-assign]


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
_reuse_redis_clients()
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
    _stop_listener()
    runtime.reset()


# The worker's listener thread and the event that stops it (one per process).
_listener: tuple[threading.Thread, threading.Event] | None = None
# Pools whose tasks run in the worker's own process: its listener claims right there.
_IN_PROCESS_POOLS = ("celery.concurrency.thread", "celery.concurrency.solo")


@signals.worker_ready.connect
def _start_worker_listener(sender: Any = None, **_: Any) -> None:
    """A worker that consumes the dispatch queue listens (``CALLQ_LISTEN_IN=worker``): one per
    fleet at a time (an advisory lock), the others stand by to take over."""
    global _listener
    s = get_settings()
    if not s.listen_enabled or s.listen_in != "worker" or _listener is not None:
        return
    if "dispatch" not in app.amqp.queues.consume_from:
        return  # e.g. the notify worker
    pool = type(getattr(sender, "pool", None)).__module__
    in_process = pool in _IN_PROCESS_POOLS
    # A prefork pool's children claim: the parent only sends them a poll, as beat would (and
    # tracks nothing: beat's tracking tick does).
    wake = _claim_here if in_process else _send_poll
    tick = _track_here if in_process and s.track_in_worker else None
    stop = threading.Event()
    thread = _listen(s, wake, leader_key=LEADER_KEY, stop=stop, on_tick=tick)
    if thread is not None:
        _listener = (thread, stop)


def _stop_listener() -> None:
    global _listener
    if _listener is not None:
        thread, stop = _listener
        stop.set()
        thread.join(timeout=10)  # a claim under way finishes placing its calls
        _listener = None


def _claim_here() -> None:
    """The worker listener's wake-up: run ``callq.poll`` in this process, no broker message
    (by name: the app never imports its tasks module, which imports the app); the claimed
    calls are placed on the "listen" lane while the listener waits for the next NOTIFY."""
    logs.clear()
    logs.bind(task="callq.poll", via="listener")
    try:
        app.tasks["callq.poll"](hand_off=True)
    finally:
        logs.clear()


def _track_here() -> None:
    """The leading worker's tracking tick, in this process, no broker message: beat wakes it
    (NOTIFY) when a poll is due, and sends its own tick only for a poll overdue by
    CALLQ_TRACK_FALLBACK_SECONDS. A chunk that fails here goes on as a broker message (a
    failure that persists shows in Flower)."""
    logs.clear()
    logs.bind(task="callq.track_due", via="tracker")
    try:
        app.tasks["callq.track_due"](hand_back=True)
    finally:
        logs.clear()


def _send_poll() -> None:
    app.send_task("callq.poll")


@signals.beat_init.connect
def _start_listener(sender: Any = None, **_: Any) -> None:
    s = get_settings()
    if s.listen_enabled and s.listen_in == "beat":
        _listen(s, _send_poll)


def _listen(
    s: Settings,
    wake: Callable[[], object],
    *,
    leader_key: int | None = None,
    stop: threading.Event | None = None,
    on_tick: Callable[[], object] | None = None,
) -> threading.Thread | None:
    """Start the listener thread (and, with ``on_tick``, its ticker while it leads), or log
    why LISTEN is off (a transaction pooler and no direct URL: beat's ticks do the work)."""
    url = s.listen_url()
    if url:
        return start_listener(
            url,
            on_notify=wake,
            min_interval_seconds=s.listen_min_interval_seconds,
            leader_key=leader_key,
            standby_seconds=s.listen_standby_seconds,
            stop=stop,
            on_tick=on_tick,
            tick_key=TRACKER_KEY if on_tick is not None else None,
        )
    if s.database_url:
        logs.get_logger("callq.listener").warning(
            "listener.off", reason="transaction pooler and no CALLQ_LISTEN_DATABASE_URL"
        )
    return None


_ASSIGNMENT_TASKS = {"callq.dispatch", "callq.reconcile"}
