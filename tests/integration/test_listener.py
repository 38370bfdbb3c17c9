"""The LISTEN wake-up (worker/listener.py) against a real PostgreSQL: one listener per database
(the advisory lock), a standby that takes over when the holder's session ends, a failed
wake-up that does not end the thread, and when a wake-up waits (a lone notification: never; one
within the interval of the last wake-up: until the interval is up)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from worker import listener as listener_module
from worker.embedded import wait_until
from worker.listener import CHANNEL, LEADER_KEY, TRACK_CHANNEL, TRACKER_KEY, start_listener


def _notify(db_url: str, channel: str = CHANNEL) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, '')", (channel,))


def _sessions(db_url: str, query: str) -> int:
    """Sessions of this database whose last statement matches ``query`` (ILIKE)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query ILIKE %s AND pid <> pg_backend_pid()",
            (query,),
        ).fetchone()
    return int(row[0]) if row else 0


class Counter:
    """Counts the wake-ups of one listener."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.n += 1

    def above(self, n: int) -> Callable[[], bool]:
        return lambda: self.n > n


def test_one_listener_per_database_and_a_standby_takes_over(db_url: str) -> None:
    first, second = Counter(), Counter()
    stop_first, stop_second = threading.Event(), threading.Event()

    def start(wake: Counter, stop: threading.Event) -> threading.Thread:
        return start_listener(db_url, wake, leader_key=LEADER_KEY, standby_seconds=0.1, stop=stop)

    leader = start(first, stop_first)
    standby: threading.Thread | None = None
    try:
        wait_until(first.above(0), timeout=30, what="the leader's wake-up on connect")
        standby = start(second, stop_second)
        wait_until(
            lambda: _sessions(db_url, "%pg_try_advisory_lock%") == 1,
            timeout=30,
            what="the second listener standing by",
        )
        assert _sessions(db_url, "LISTEN %") == 1
        seen = first.n
        _notify(db_url)
        wait_until(first.above(seen), timeout=30, what="the leader's wake-up on a NOTIFY")
        assert second.n == 0  # standing by: it never listened, never claimed

        stop_first.set()  # the leader's session ends: its lock goes with it
        leader.join(timeout=30)
        assert not leader.is_alive()
        wait_until(second.above(0), timeout=30, what="the standby taking over")
        seen = second.n
        _notify(db_url)
        wait_until(second.above(seen), timeout=30, what="the new leader's wake-up on a NOTIFY")
        assert _sessions(db_url, "LISTEN %") == 1
    finally:
        _stop(leader, stop_first, standby, stop_second)


def _stop(*pairs: threading.Thread | threading.Event | None) -> None:
    """Stop listeners given as (thread, its stop event) pairs; a thread may be None."""
    events = [e for e in pairs if isinstance(e, threading.Event)]
    for event in events:
        event.set()
    for thread in pairs:
        if isinstance(thread, threading.Thread):
            thread.join(timeout=30)


def _tracker_key_holders(db_url: str) -> int:
    """Sessions of this database holding the tracker key (advisory locks are per database;
    other tests on the server hold theirs)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND objsubid = 1 AND classid = (%(k)s::bigint >> 32)::oid"
            " AND objid = (%(k)s::bigint & 4294967295)::oid",
            {"k": TRACKER_KEY},
        ).fetchone()
    return int(row[0]) if row else 0


def test_only_the_leader_ticks_holding_the_tracker_key(db_url: str) -> None:
    """The leader's ticker calls ``on_tick`` once on connect and once per NOTIFY on the
    tracking channel (a failing tick included: the next NOTIFY ticks again), while its session
    holds the tracker key; the standby neither ticks nor holds it. When the leader stops, the
    key goes with its session and the standby, now leading, ticks."""
    first, second = Counter(), Counter()
    stop_first, stop_second = threading.Event(), threading.Event()

    def failing_once() -> None:
        first()
        if first.n == 2:
            raise RuntimeError("tick failed")

    def start(tick: Callable[[], None], stop: threading.Event) -> threading.Thread:
        return start_listener(
            db_url,
            lambda: None,
            leader_key=LEADER_KEY,
            standby_seconds=0.1,
            stop=stop,
            on_tick=tick,
            tick_key=TRACKER_KEY,
        )

    leader = start(failing_once, stop_first)
    standby: threading.Thread | None = None
    try:
        wait_until(first.above(0), timeout=30, what="the leader's tick on connect")
        assert _tracker_key_holders(db_url) == 1
        for n in (1, 2, 3):  # the second tick fails
            _notify(db_url, TRACK_CHANNEL)
            wait_until(first.above(n), timeout=30, what=f"tick {n + 1}, on a NOTIFY")
        _notify(db_url)  # due calls: the listener's wake-up, not a tick
        standby = start(second, stop_second)
        wait_until(
            lambda: _sessions(db_url, "%pg_try_advisory_lock%") == 1,
            timeout=30,
            what="the second listener standing by",
        )
        _notify(db_url, TRACK_CHANNEL)
        wait_until(first.above(4), timeout=30, what="the leader's tick, with a standby")
        assert second.n == 0 and _tracker_key_holders(db_url) == 1

        stop_first.set()
        leader.join(timeout=30)
        wait_until(second.above(0), timeout=30, what="the new leader's tick on connect")
        _notify(db_url, TRACK_CHANNEL)
        wait_until(second.above(1), timeout=30, what="the new leader's tick on a NOTIFY")
        assert first.n == 5
        assert _tracker_key_holders(db_url) == 1
    finally:
        _stop(leader, stop_first, standby, stop_second)
    wait_until(lambda: _tracker_key_holders(db_url) == 0, timeout=30, what="the key released")


def test_the_leader_waits_out_a_question_holding_the_tracker_key_shared(db_url: str) -> None:
    """Beat's question (``due_work()``) holds the tracker key shared for its transaction: a
    leader connecting meanwhile waits for it and then ticks, rather than running without a
    tracker."""
    ticks = Counter()
    stop = threading.Event()
    with psycopg.connect(db_url) as beat:
        beat.execute("SELECT pg_advisory_xact_lock_shared(%s)", (TRACKER_KEY,))
        thread = start_listener(
            db_url, lambda: None, leader_key=LEADER_KEY, stop=stop, on_tick=ticks,
            tick_key=TRACKER_KEY,
        )  # fmt: skip
        try:
            wait_until(
                lambda: _sessions(db_url, "%pg_advisory_lock(%") == 1,
                timeout=30,
                what="the leader waiting for the tracker key",
            )
            assert ticks.n == 0
            beat.commit()  # the question's transaction ends
            wait_until(ticks.above(0), timeout=30, what="the leader's tick on connect")
            assert _tracker_key_holders(db_url) == 1
        finally:
            _stop(thread, stop)


def test_a_session_holding_the_tracker_key_keeps_the_ticker_off(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session holding the key for longer than the wait: the leader listens and claims
    without a ticker (no tick on connect, none on a tracking NOTIFY)."""
    monkeypatch.setattr(listener_module, "TICK_KEY_WAIT", "200ms")
    ticks, wakes = Counter(), Counter()
    stop = threading.Event()
    with psycopg.connect(db_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (TRACKER_KEY,))
        thread = start_listener(
            db_url, wakes, leader_key=LEADER_KEY, stop=stop, on_tick=ticks, tick_key=TRACKER_KEY
        )
        try:
            wait_until(wakes.above(0), timeout=30, what="the leader listening without a ticker")
            _notify(db_url, TRACK_CHANNEL)
            _notify(db_url)
            wait_until(wakes.above(1), timeout=30, what="the leader's wake-up on a NOTIFY")
            assert ticks.n == 0
        finally:
            _stop(thread, stop)


def test_a_failed_wake_up_leaves_the_listener_running(db_url: str) -> None:
    calls = Counter()

    def wake() -> None:
        calls()
        if calls.n == 2:  # the first NOTIFY's claim fails (the database, a bug)
            raise RuntimeError("claim failed")

    stop = threading.Event()
    thread = start_listener(db_url, wake, stop=stop)
    try:
        wait_until(calls.above(0), timeout=30, what="the wake-up on connect")
        _notify(db_url)
        wait_until(calls.above(1), timeout=30, what="the failing wake-up")
        _notify(db_url)
        wait_until(calls.above(2), timeout=30, what="a wake-up after the failed one")
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def _waits_around_a_wake_up(db_url: str, min_interval: float) -> list[float]:
    """The timeouts of the listener's waits for input until it has acted on a NOTIFY sent right
    after its wake-up on connect."""
    waits: list[float] = []
    real_drain = listener_module._drain

    def drain(conn: psycopg.Connection[Any], timeout: float) -> bool:
        waits.append(timeout)
        return real_drain(conn, timeout)

    wakes, stop = Counter(), threading.Event()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(listener_module, "_drain", drain)
        thread = start_listener(db_url, wakes, min_interval_seconds=min_interval, stop=stop)
        try:
            wait_until(wakes.above(0), timeout=30, what="the wake-up on connect")
            _notify(db_url)
            wait_until(wakes.above(1), timeout=30, what="the wake-up on a NOTIFY")
        finally:
            stop.set()
            thread.join(timeout=30)
    return waits


def test_a_lone_notification_wakes_at_once_and_a_burst_waits_out_the_interval(
    db_url: str,
) -> None:
    # no interval: every notification comes after a quiet spell, acted on without a timer's
    # wait (only the idle waits for input, 1 s each)
    assert set(_waits_around_a_wake_up(db_url, 0.0)) == {1.0}
    # a long interval: the NOTIFY right after the wake-up on connect waits it out, gathering
    assert any(w < 1.0 for w in _waits_around_a_wake_up(db_url, 0.5))
