"""Beat skips the ticks that would find nothing (worker/beat.py, ``due_work()``).

The property that matters: whenever a tick's task would take something, ``due_work()`` says its
work waits (a tick held back for work that waits would delay calls, polls or notifications).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import beat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.queries import DUE_WORK, TAKE_DUE_POLLS
from worker import runtime
from worker.beat import WORK_OF, Scheduler
from worker.celery_app import app
from worker.embedded import wait_until
from worker.listener import TRACK_CHANNEL, TRACKER_KEY

from .dbutil import Conn, connect, make_provider, make_template, make_user, one, schedule


def due(
    conn: Conn, tracker_key: int | None = None, fallback: float = 0.0, wake: bool = False
) -> dict[str, bool]:
    params = {"tracker_key": tracker_key, "fallback_seconds": fallback, "wake_tracker": wake}
    row = conn.execute(DUE_WORK, params).fetchone()
    assert row is not None
    return dict(zip(("calls", "polls", "notifications"), row, strict=True))


def placed_call(conn: Conn) -> Any:
    """A placed call's assignment id."""
    user = make_user(conn, call_limit=None)
    qid = schedule(conn, user, make_template(conn, user))
    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (qid, make_provider(conn)))
    assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is True
    assert one(conn, "SELECT mark_call_placed(%s, %s)", (aid, f"pc-{aid}")) is True
    return aid


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    calls=st.lists(
        st.tuples(st.integers(-3600, 3600), st.integers(1, 10)), min_size=0, max_size=12
    ),
)
def test_due_calls_are_seen_whenever_the_claim_would_take_one(
    conn: Conn, calls: list[tuple[int, int]]
) -> None:
    """Calls due or ahead by any offset, at any priority: ``calls`` is true exactly when one
    is due, and a claim finds nothing when it is false. A call ahead is at least a minute
    ahead, so none falls due while the example runs."""
    user = make_user(conn, call_limit=None, max_concurrent=1000)
    template = make_template(conn, user)
    now = datetime.now(UTC)
    try:
        for offset, priority in calls:
            schedule(
                conn,
                user,
                template,
                priority=priority,
                scheduled_time=now + timedelta(seconds=offset + 60 if offset > 0 else offset - 1),
            )
        waits = due(conn)["calls"]
        assert waits == any(offset <= 0 for offset, _ in calls)
        claimed = conn.execute("SELECT queue_id FROM claim_due_calls(50, 'w', 30)").fetchall()
        assert bool(claimed) == waits
        assert due(conn)["calls"] is False  # every due call claimed: nothing left to claim
    finally:
        conn.execute("DELETE FROM call_queue WHERE user_id = %s", (user,))


def test_due_polls_and_notifications_follow_their_times(conn: Conn) -> None:
    user = make_user(conn, call_limit=None)
    template = make_template(conn, user)
    provider = make_provider(conn, max_calls=5)
    assert due(conn) == {"calls": False, "polls": False, "notifications": False}

    qid = schedule(conn, user, template)
    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (qid, provider))
    assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is True
    assert one(conn, "SELECT mark_call_placed(%s, %s)", (aid, f"pc-{aid}")) is True
    conn.execute(
        "UPDATE call_assignments SET next_poll_at = now() + interval '1 minute' WHERE id = %s",
        (aid,),
    )
    assert due(conn)["polls"] is False
    assert conn.execute(TAKE_DUE_POLLS, {"limit": 10, "defer": 0.0}).fetchall() == []
    conn.execute(
        "UPDATE call_assignments SET next_poll_at = now() - interval '1 second' WHERE id = %s",
        (aid,),
    )
    assert due(conn)["polls"] is True
    assert len(conn.execute(TAKE_DUE_POLLS, {"limit": 10, "defer": 0.0}).fetchall()) == 1

    endpoint = one(
        conn,
        "INSERT INTO notification_endpoints (user_id, url, secret)"
        " VALUES (%s, 'https://example.com/hook', 'secret') RETURNING id",
        (user,),
    )
    conn.execute(
        "INSERT INTO call_notifications (endpoint_id, user_id, queue_id, next_attempt_at)"
        " VALUES (%s, %s, %s, now() + interval '1 minute')",
        (endpoint, user, qid),
    )
    assert due(conn)["notifications"] is False
    assert conn.execute("SELECT * FROM claim_notifications(10)").fetchall() == []
    conn.execute("UPDATE call_notifications SET next_attempt_at = now() - interval '1 second'")
    assert due(conn)["notifications"] is True
    assert len(conn.execute("SELECT * FROM claim_notifications(10)").fetchall()) == 1


def woken(listening: Conn, sender: Conn) -> int:
    """Tracker wake-ups (NOTIFY on the tracking channel) that reached ``listening`` since the
    last look: ``sender`` then sends a marker, and notifications arrive in commit order, so
    every earlier wake-up is in by the time the marker is."""
    sender.execute("SELECT pg_notify(%s, 'marker')", (TRACK_CHANNEL,))
    count = 0
    for n in listening.notifies(timeout=30):
        if n.payload == "marker":
            return count
        count += n.channel == TRACK_CHANNEL
    raise AssertionError("the marker notification never came")


def test_a_tracker_makes_the_tracking_tick_a_fallback(
    conn: Conn, db_url: str, pg_admin_url: str
) -> None:
    """While a session of this database holds the tracker key (the leading worker tracks in
    process), polls are reported only once one is overdue by the fallback, and the tracking
    tick's question wakes the tracker when a poll is due; without the key (or with it held in
    another database: advisory locks are per database), polls as soon as one is due and no
    wake-up. Every combination of a grid of overdue times and fallbacks, each at least 2 s
    from the edge."""
    aid = placed_call(conn)
    with connect(db_url) as tracker, connect(pg_admin_url) as elsewhere, connect(db_url) as ear:
        ear.execute(f"LISTEN {TRACK_CHANNEL}")
        elsewhere.execute("SELECT pg_advisory_lock(%s)", (TRACKER_KEY,))
        for held in (False, True):
            if held:
                tracker.execute("SELECT pg_advisory_lock(%s)", (TRACKER_KEY,))
            for overdue in (-30, 2, 20, 200):
                conn.execute(
                    "UPDATE call_assignments SET next_poll_at = now() - make_interval(secs => %s)"
                    " WHERE id = %s",
                    (overdue, aid),
                )
                for fallback in (0, 10, 100):
                    case = (held, overdue, fallback)
                    expected = overdue >= (fallback if held else 0)
                    assert due(conn, TRACKER_KEY, fallback)["polls"] is expected, case
                    assert woken(ear, conn) == 0, case  # only the tracking tick's question wakes
                    assert due(conn, TRACKER_KEY, fallback, wake=True)["polls"] is expected, case
                    assert woken(ear, conn) == int(held and overdue >= 0), case
                    assert due(conn)["polls"] is (overdue >= 0)  # no tracker asked for
        tracker.execute("SELECT pg_advisory_unlock(%s)", (TRACKER_KEY,))
        assert due(conn, TRACKER_KEY, 100, wake=True)["polls"] is True  # released: beat ticks
        assert woken(ear, conn) == 0


def test_a_running_campaign_lets_the_poll_through(conn: Conn) -> None:
    """A campaign's calls are the claim's to judge (lanes, pacing): any running campaign sends
    the poll."""
    user = make_user(conn, call_limit=None)
    template = make_template(conn, user)
    campaign = one(
        conn,
        "INSERT INTO call_campaigns (user_id, template_id, name) VALUES (%s, %s, 'c') RETURNING id",
        (user, template),
    )
    assert due(conn)["calls"] is False  # a draft campaign claims nothing
    conn.execute("UPDATE call_campaigns SET status = 'running' WHERE id = %s", (campaign,))
    assert due(conn)["calls"] is True


class _Entry:
    def __init__(self, task: str) -> None:
        self.task = task
        self.name = task


@pytest.fixture
def scheduler(worker_db: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Scheduler, list[str]]:
    """Our scheduler with Celery's sending replaced by a record of what it would send."""
    sent: list[str] = []

    def send(self: Any, entry: Any, producer: Any = None, advance: bool = True, **_: Any) -> str:
        sent.append(entry.task)
        return entry.task

    monkeypatch.setattr(beat.Scheduler, "apply_async", send)
    monkeypatch.setattr(beat.Scheduler, "setup_schedule", lambda self: None)
    return Scheduler(app=app, lazy=True), sent


def test_beat_sends_a_tick_only_when_its_work_waits(
    worker_db: str,
    conn: Conn,
    scheduler: tuple[Scheduler, list[str]],
    monkeypatch: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through ``apply_entry``, what beat's tick calls: a skipped tick is neither sent nor
    logged as sent."""
    sched, sent = scheduler
    monkeypatch.setattr("worker.beat.ANSWER_SECONDS", 0.0)  # ask again at every tick
    caplog.set_level(logging.INFO, logger="celery.beat")
    for task in [*WORK_OF, "callq.health_check", "callq.reap"]:
        sched.apply_entry(_Entry(task))
    assert sent == ["callq.health_check", "callq.reap"]  # nothing waits: only the others
    logged = [r.getMessage() for r in caplog.records if "Sending due task" in r.getMessage()]
    assert len(logged) == 2 and all("callq.health_check" in m or "callq.reap" in m for m in logged)

    user = make_user(conn, call_limit=None)
    schedule(conn, user, make_template(conn, user))
    sent.clear()
    for task in WORK_OF:
        sched.apply_entry(_Entry(task))
    assert sent == ["callq.poll"]


def test_beat_sends_every_tick_when_the_database_cannot_answer(
    scheduler: tuple[Scheduler, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sched, sent = scheduler

    class Down:
        def due_work(self, *_: Any, **__: Any) -> dict[str, bool]:
            raise OSError("connection refused")

    monkeypatch.setattr(runtime, "database", lambda: Down())
    for task in WORK_OF:
        sched.apply_entry(_Entry(task))
    assert sent == list(WORK_OF)


def test_beat_holds_the_tracking_tick_while_a_tracker_keeps_up(
    worker_db: str, conn: Conn, scheduler: tuple[Scheduler, list[str]], monkeypatch: Any
) -> None:
    """A poll 1 s overdue: beat sends no tracking tick while the tracker key is held but wakes
    the tracker (NOTIFY), and sends its tick once the key is released (the leader gone)."""
    sched, sent = scheduler
    monkeypatch.setattr("worker.beat.ANSWER_SECONDS", 0.0)
    aid = placed_call(conn)
    conn.execute(
        "UPDATE call_assignments SET next_poll_at = now() - interval '1 second' WHERE id = %s",
        (aid,),
    )
    with connect(worker_db) as tracker:
        tracker.execute("SELECT pg_advisory_lock(%s)", (TRACKER_KEY,))
        tracker.execute(f"LISTEN {TRACK_CHANNEL}")
        sched.apply_entry(_Entry("callq.track_due"))
        assert sent == []
        assert woken(tracker, conn) == 1  # woken instead
        pid = tracker.info.backend_pid
    # The server ends a closed session (and releases its locks) after the client has gone.
    wait_until(
        lambda: not one(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)),
        timeout=10,
        interval=0.01,
        what="the tracker's session to end",
    )
    sched.apply_entry(_Entry("callq.track_due"))  # the session ended: its lock with it
    assert sent == ["callq.track_due"]
