"""LISTEN/NOTIFY wake-up: a call scheduled for now is claimed without waiting for beat's tick.

``schedule_call`` runs ``pg_notify('callq_queue', '')`` for a call due now. A thread in the beat
process listens and sends one ``callq.poll`` per burst of notifications. Beat's periodic poll
stays on as the fallback (Supabase's transaction pooler does not carry LISTEN).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg

from models.session import libpq_url
from worker import logs

CHANNEL = "callq_queue"
log = logs.get_logger("callq.listener")


def start_listener(
    database_url: str,
    on_notify: Callable[[], object],
    *,
    coalesce_seconds: float = 0.005,
    min_interval_seconds: float = 0.02,
) -> threading.Thread:
    """Start the daemon thread that calls ``on_notify`` (send a poll) per burst of notifications."""
    thread = threading.Thread(
        target=_run_forever,
        args=(database_url, on_notify, coalesce_seconds, min_interval_seconds),
        name="callq-listener",
        daemon=True,
    )
    thread.start()
    return thread


def _run_forever(
    database_url: str,
    on_notify: Callable[[], object],
    coalesce_seconds: float,
    min_interval_seconds: float,
) -> None:
    backoff = 0.5
    while True:
        try:
            _listen(database_url, on_notify, coalesce_seconds, min_interval_seconds)
        except psycopg.Error as exc:
            log.warning("listener.disconnected", error=type(exc).__name__, retry_in=backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


def _listen(
    database_url: str,
    on_notify: Callable[[], object],
    coalesce_seconds: float,
    min_interval_seconds: float,
) -> None:
    """Call ``on_notify`` once per burst of notifications, and at most once per
    ``min_interval_seconds``: calls that trickle in one by one are claimed together."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        log.info("listener.started")
        # A notification may have been missed while disconnected: poll once on (re)connect.
        on_notify()
        last_sent = time.monotonic()
        while True:
            got = False
            for _ in conn.notifies(timeout=1.0, stop_after=1):
                got = True
            if not got:
                continue
            wait = max(coalesce_seconds, last_sent + min_interval_seconds - time.monotonic())
            for _ in conn.notifies(timeout=wait):
                pass
            on_notify()
            last_sent = time.monotonic()
