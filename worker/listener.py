"""LISTEN/NOTIFY wake-up: a call scheduled for now is claimed without waiting for beat's tick.

``schedule_call`` runs ``pg_notify('callq_queue', '')`` for a call due now. A thread listens and
calls ``on_notify`` once per burst of notifications: in a worker (the default), ``on_notify``
claims and places the due calls in the worker's own process, with no broker message between
the notification and the claim; in beat (``CALLQ_LISTEN_IN=beat``) it sends one ``callq.poll``.
Beat's periodic poll stays on as the fallback (Supabase's transaction pooler does not carry
LISTEN, and a call due later is never notified).

One listener per fleet is enough: with ``leader_key``, the thread listens only while its
session holds that advisory lock, and the other workers' threads stand by and take over when
the holder's session ends (its process died or lost its connection).

The leader may also tick: with ``on_tick``, its session holds ``tick_key`` and listens on
``TRACK_CHANNEL`` too, and a second thread calls ``on_tick`` once per burst of those
notifications (in a worker: the tracking tick, in process, no broker message; beat sends the
NOTIFY when a poll is due, ``due_work()``, and its own message only as a fallback). The lock
goes with the session: a leader that dies or loses its connection stops ticking, and beat's
tick takes over at once.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from models.session import libpq_url
from worker import logs

CHANNEL = "callq_queue"
# Beat's wake-up of the leading worker's tracker (due_work() with p_wake_tracker).
TRACK_CHANNEL = "callq_track"
# The advisory lock a worker's listener holds while it listens (one listener per database).
LEADER_KEY = 0x63616C6C71  # "callq"
# Held on the same session while the leader's ticker runs (worker: the in-process tracker).
TRACKER_KEY = 0x63616C6C74  # "callt"
TICK_KEY_WAIT = "3s"  # the longest wait for the tick key (a lock_timeout)
log = logs.get_logger("callq.listener")


@dataclass(frozen=True)
class _Listener:
    """What one listener thread does (the arguments of :func:`start_listener`)."""

    database_url: str
    on_notify: Callable[[], object]
    min_interval_seconds: float
    leader_key: int | None
    standby_seconds: float
    stop: threading.Event
    on_tick: Callable[[], object] | None = None
    tick_key: int | None = None


def start_listener(
    database_url: str,
    on_notify: Callable[[], object],
    *,
    min_interval_seconds: float = 0.02,
    leader_key: int | None = None,
    standby_seconds: float = 5.0,
    stop: threading.Event | None = None,
    on_tick: Callable[[], object] | None = None,
    tick_key: int | None = None,
) -> threading.Thread:
    """Start the daemon thread that calls ``on_notify`` per burst of notifications: at once
    when the last call was ``min_interval_seconds`` ago or more, else when that interval is up.

    ``leader_key``: listen only while holding this advisory lock (tried again every
    ``standby_seconds``). ``stop``: set it to end the thread (tests, shutdown).
    ``on_tick``: while listening, also listen on ``TRACK_CHANNEL`` and call this once per
    burst of its notifications (and once on connect), from a thread of its own, holding
    ``tick_key`` on the listener's session meanwhile.
    """
    listener = _Listener(
        database_url,
        on_notify,
        min_interval_seconds,
        leader_key,
        standby_seconds,
        stop or threading.Event(),
        on_tick,
        tick_key,
    )
    thread = threading.Thread(
        target=_run_forever, args=(listener,), name="callq-listener", daemon=True
    )
    thread.start()
    return thread


def _run_forever(listener: _Listener) -> None:
    backoff = 0.5
    while not listener.stop.is_set():
        try:
            _listen(listener)
        except psycopg.Error as exc:
            log.warning("listener.disconnected", error=type(exc).__name__, retry_in=backoff)
            listener.stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)


def _call(callback: Callable[[], object], failed: str = "listener.wake_failed") -> None:
    """One wake-up (or tick); a failure is logged by type and left to beat's tick and the
    reaper (the thread itself goes on)."""
    try:
        callback()
    except Exception as exc:
        log.warning(failed, error=type(exc).__name__)


@dataclass(frozen=True)
class _Ticker:
    """The thread beside a leading listener that calls ``on_tick`` when woken."""

    wake: threading.Event
    done: threading.Event

    def stop(self) -> None:
        self.done.set()
        self.wake.set()


def _tick(listener: _Listener, conn: psycopg.Connection[Any]) -> _Ticker | None:
    """Start the ticker beside a leading listener, woken once now (None: no ticker, or another
    session holds the tick key)."""
    on_tick, key = listener.on_tick, listener.tick_key
    if on_tick is None:
        return None
    if key is not None and not _take_tick_key(conn, key):
        log.warning("listener.ticker_off", reason="another session holds the tick key")
        return None
    conn.execute(f"LISTEN {TRACK_CHANNEL}")
    ticker = _Ticker(threading.Event(), threading.Event())

    def run() -> None:
        while True:
            ticker.wake.wait()
            if ticker.done.is_set() or listener.stop.is_set():
                return
            ticker.wake.clear()  # wake-ups while it ticks: one more tick after
            _call(on_tick, "listener.tick_failed")

    threading.Thread(target=run, name="callq-ticker", daemon=True).start()
    ticker.wake.set()  # a wake-up may have been missed while no tracker ran
    return ticker


def _take_tick_key(conn: psycopg.Connection[Any], key: int) -> bool:
    """Take the tick key for this session, waiting up to ``TICK_KEY_WAIT`` (beat's question,
    ``due_work()``, holds it shared for the moment of its transaction)."""
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (TICK_KEY_WAIT,))
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg.errors.LockNotAvailable:
        return False
    return True


def _lead(conn: psycopg.Connection[Any], key: int, every: float, stop: threading.Event) -> bool:
    """Wait until this session holds the listener lock (True), or ``stop`` is set."""
    announced = False
    while not stop.is_set():
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if row is not None and row[0]:
            return True
        if not announced:
            log.info("listener.standby")
            announced = True
        stop.wait(every)
    return False


def _listen(listener: _Listener) -> None:
    """Call ``on_notify`` once per burst of notifications, and at most once per
    ``min_interval_seconds``. A notification after a quiet spell is acted on at once (a call
    that trickles in alone is claimed without a timer's wait, which costs a wake-up of the
    thread and the call's latency); one within the interval waits out the rest of it and
    gathers what comes meanwhile (a burst is one claim)."""
    stop, key = listener.stop, listener.leader_key
    with psycopg.connect(libpq_url(listener.database_url), autocommit=True) as conn:
        if key is not None and not _lead(conn, key, listener.standby_seconds, stop):
            return
        ticker = _tick(listener, conn)  # before LISTEN: the session shows LISTEN as its last
        try:
            conn.execute(f"LISTEN {CHANNEL}")
            log.info("listener.started")
            # A notification may have been missed while disconnected: poll once on (re)connect.
            _call(listener.on_notify)
            last_sent = time.monotonic()
            while not stop.is_set():
                if not _woken(_drain(conn, 1.0), ticker):
                    continue
                # within the interval of the last wake-up: gather the burst until it is up
                deadline = last_sent + listener.min_interval_seconds
                while (left := deadline - time.monotonic()) > 0:
                    _woken(_drain(conn, left), ticker)
                _call(listener.on_notify)
                last_sent = time.monotonic()
        finally:
            if ticker is not None:
                ticker.stop()


def _woken(channels: frozenset[str], ticker: _Ticker | None) -> bool:
    """Hand a tracker wake-up to the ticker; whether due calls were announced."""
    if ticker is not None and TRACK_CHANNEL in channels:
        ticker.wake.set()
    return CHANNEL in channels


def _drain(conn: psycopg.Connection[Any], timeout: float) -> frozenset[str]:
    """Wait up to ``timeout`` seconds for input on the connection (nothing runs meanwhile:
    psycopg's own wait looks every 0.1 s, ten wake-ups a second for an idle listener); the
    channels of the notifications that came, which are consumed."""
    readable, _, _ = select.select([conn.fileno()], [], [], timeout)
    if not readable:
        return frozenset()
    return frozenset(n.channel for n in conn.notifies(timeout=0))
