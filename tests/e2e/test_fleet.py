"""The running system: real worker and beat processes, real database and broker, the simulator.

Every test ends by checking the invariants: each call terminal, each answered call dialed once,
no provider slot still held.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest

from providers.simulator import Simulator
from tests.e2e.conftest import (
    all_terminal,
    creates_by_queue,
    slots_held,
    status_counts,
)
from worker.embedded import wait_until
from worker.fleet import Fleet
from worker.seed import Seeded, schedule_calls

pytestmark = pytest.mark.e2e


def _rabbitmq_url() -> str:
    """The RabbitMQ URL this run was given; never a guessed default."""
    url = os.environ.get("TEST_RABBITMQ_URL")
    if not url:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but TEST_RABBITMQ_URL is not set")
        pytest.skip("TEST_RABBITMQ_URL is not set (CI sets it)")
    return url


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_batch_reaches_right_terminal_states(
    broker: str,
    conn: psycopg.Connection[Any],
    seeded: Seeded,
    sim: Simulator,
    fleet: Fleet,
) -> None:
    if broker == "rabbitmq":
        fleet.env = {**fleet.env, "CALLQ_BROKER_URL": _rabbitmq_url()}
    sim.configure({"outcomes_by_suffix": {"9001": "busy", "9002": "failed_permanent"}})
    answered = schedule_calls(conn, seeded, 16)
    later = schedule_calls(conn, seeded, 4, delay_seconds=2, priority=1, start=100)
    busy = schedule_calls(conn, seeded, 2, suffix="9001", start=200)
    invalid = schedule_calls(conn, seeded, 1, suffix="9002", start=300)
    ids = answered + later + busy + invalid

    fleet.start_worker()
    fleet.start_beat()
    wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")

    assert status_counts(conn, ids) == {"completed": 20, "failed": 3}
    history = conn.execute(
        "SELECT q.id, h.status, h.provider_id, h.provider_call_id, h.duration_seconds,"
        " h.transcript IS NOT NULL, q.attempts FROM call_queue q"
        " JOIN call_history h ON h.queue_id = q.id WHERE q.id = ANY(%s)",
        (ids,),
    ).fetchall()
    by_id = {row[0]: row for row in history}
    assert len(by_id) == len(ids), "every call has exactly one history row"
    for qid in answered + later:
        _, status, provider_id, provider_call_id, duration, has_transcript, _ = by_id[qid]
        assert status == "completed"
        assert provider_id in seeded.provider_ids.values()
        assert provider_call_id and duration is not None and has_transcript
    for qid in busy:
        assert by_id[qid][1] == "busy" and by_id[qid][6] == 3  # the last outcome; max_attempts
    assert by_id[invalid[0]][6] == 1  # a permanent failure is not retried

    retries = conn.execute(
        "SELECT count(*) FROM call_retries WHERE queue_id = ANY(%s)", (busy,)
    ).fetchone()
    assert retries is not None and retries[0] == 6  # one row per failed attempt
    usage = conn.execute(  # the exact figures (endings that raced for the row may be pending)
        "SELECT calls_made, minutes_used FROM user_call_usage_live WHERE user_id = %s",
        (seeded.user_id,),
    ).fetchone()
    minutes = conn.execute(
        "SELECT sum(ceil(duration_seconds / 60.0)) FROM call_history"
        " WHERE queue_id = ANY(%s) AND status = 'completed'",
        (ids,),
    ).fetchone()
    assert usage is not None and minutes is not None
    dials = creates_by_queue(sim)
    # every provider dial counts (billing model): 20 answered, 2 busy x 3 attempts, 1 refused
    assert usage[0] == sum(dials.get(str(q), 0) for q in ids) == 27
    assert usage[1] == int(minutes[0])  # minutes rounded up per call
    assert all(dials.get(str(q)) == 1 for q in answered + later)
    assert slots_held(conn) == 0
    logs = "".join(p.read_text(errors="replace") for p in fleet.log_dir.glob("*.log"))  # type: ignore[union-attr]
    assert "call.placed" in logs and "+1555" not in logs and "Customer " not in logs


def test_refused_provider_fails_calls_over(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    vapi = seeded.provider_ids["vapi"]
    conn.execute(
        "UPDATE call_service_providers SET base_url = 'http://127.0.0.1:9/vapi' WHERE id = %s",
        (vapi,),
    )
    ids = schedule_calls(conn, seeded, 12)
    fleet.start_worker()
    fleet.start_beat()
    wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")

    assert status_counts(conn, ids) == {"completed": 12}
    providers = conn.execute(
        "SELECT DISTINCT provider_id FROM call_history WHERE queue_id = ANY(%s)", (ids,)
    ).fetchall()
    assert {row[0] for row in providers} == {seeded.provider_ids["synthflow"]}
    failed_over = conn.execute(
        "SELECT count(*) FROM call_retries WHERE queue_id = ANY(%s) AND provider_id = %s"
        " AND reason = 'provider_error'",
        (ids, vapi),
    ).fetchone()
    assert failed_over is not None and failed_over[0] >= 1
    assert slots_held(conn) == 0


def test_provider_5xx_window_reconciles_then_fails_over_without_double_dial(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    # A 500 on create may hide a placed call: the worker looks it up until the provider answers
    # again, and only then (found nothing) places it elsewhere.
    sim.configure({"outages": [{"start": 0, "end": 4, "mode": "500", "provider": "vapi"}]})
    ids = schedule_calls(conn, seeded, 8)
    fleet.start_worker()
    fleet.start_beat()
    wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")

    assert status_counts(conn, ids) == {"completed": 8}
    dials = creates_by_queue(sim)
    assert {str(q): dials.get(str(q)) for q in ids} == {str(q): 1 for q in ids}
    assert slots_held(conn) == 0


def test_worker_killed_mid_call_loses_nothing_and_dials_once(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    sim.configure({"latency_ms": 300})
    ids = schedule_calls(conn, seeded, 20)
    fleet.start_worker("doomed")
    fleet.start_beat()
    wait_until(
        lambda: sim.stats().get("total_creates", 0) >= 3, timeout=60, what="calls being placed"
    )
    fleet.kill("doomed")
    fleet.start_worker("survivor")
    wait_until(lambda: all_terminal(conn, ids), timeout=150, what="every call terminal")

    assert status_counts(conn, ids) == {"completed": 20}
    dials = creates_by_queue(sim)
    assert {str(q): dials.get(str(q)) for q in ids} == {str(q): 1 for q in ids}
    assert slots_held(conn) == 0


def test_duplicate_beats_dial_no_one_twice(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    ids = schedule_calls(conn, seeded, 30)
    fleet.start_worker()
    fleet.start_beat("beat-1")
    fleet.start_beat("beat-2")
    wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")

    dials = creates_by_queue(sim)
    assert {str(q): dials.get(str(q)) for q in ids} == {str(q): 1 for q in ids}
    assert slots_held(conn) == 0


def test_create_that_timed_out_but_placed_the_call_is_found_not_redialed(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    # The provider holds each create for 1 s, answers 504, and places the call anyway.
    sim.configure(
        {
            "outages": [{"start": 0, "end": 3, "mode": "timeout", "provider": "vapi"}],
            "timeout_seconds": 1.0,
            "timeout_creates_call": True,
        }
    )
    ids = schedule_calls(conn, seeded, 6)
    fleet.start_worker()
    fleet.start_beat()
    wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")

    assert status_counts(conn, ids) == {"completed": 6}
    dials = creates_by_queue(sim)
    assert {str(q): dials.get(str(q)) for q in ids} == {str(q): 1 for q in ids}
    vapi_calls = conn.execute(
        "SELECT count(*) FROM call_history WHERE queue_id = ANY(%s) AND provider_id = %s",
        (ids, seeded.provider_ids["vapi"]),
    ).fetchone()
    assert vapi_calls is not None and vapi_calls[0] >= 1  # found at Vapi, not re-sent elsewhere
    assert slots_held(conn) == 0


def _listeners(conn: psycopg.Connection[Any]) -> int:
    """Sessions of this database listening for due calls."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND query ILIKE 'LISTEN %%'"
    ).fetchone()
    return int(row[0]) if row else 0


def _dialed_once(sim: Simulator, ids: list[Any]) -> bool:
    dials = creates_by_queue(sim)
    return all(dials.get(str(q)) == 1 for q in ids)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_the_worker_claims_notified_calls_itself(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet, pool: str
) -> None:
    """No beat runs, so no poll message exists: the worker's LISTEN thread claims and places
    the calls scheduled for now in its own process (threads), or its parent sends a poll per
    wake-up and a child claims (prefork: the parent never claims, what it opened would be
    shared with the children it forks). Beat, started afterwards, wakes the leading worker of a
    threads pool (the default, CALLQ_TRACK_IN_WORKER) to track the calls in its own process (a
    NOTIFY, no tracking message); a prefork fleet's calls are tracked by beat's tick messages."""
    fleet.start_worker(pool=pool, concurrency=16 if pool == "threads" else 2)
    wait_until(lambda: _listeners(conn) == 1, timeout=60, what="the worker listening")
    ids = schedule_calls(conn, seeded, 5)
    wait_until(lambda: _dialed_once(sim, ids), timeout=60, what="each call dialed, no beat")
    fleet.start_beat()
    wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")
    assert fleet.log_dir is not None
    tracked_here = '"via": "tracker"' in (fleet.log_dir / "worker.log").read_text(errors="replace")
    assert tracked_here is (pool == "threads")

    assert status_counts(conn, ids) == {"completed": 5}
    assert _dialed_once(sim, ids)
    assert slots_held(conn) == 0


def test_one_worker_listens_and_a_standby_takes_over(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    """Two workers, one listener (an advisory lock); the standby takes the listener over when
    the first worker dies, and claims what is scheduled then, still without beat."""
    standby = Fleet(env={**fleet.env, "CALLQ_LISTEN_STANDBY_SECONDS": "0.2"}, log_dir=fleet.log_dir)
    try:
        standby.start_worker("first")
        wait_until(lambda: _listeners(conn) == 1, timeout=60, what="the first worker listening")
        standby.start_worker("second")
        assert fleet.log_dir is not None
        log = fleet.log_dir / "second.log"
        wait_until(
            lambda: log.exists() and "listener.standby" in log.read_text(errors="replace"),
            timeout=60,
            what="the second worker standing by",
        )
        assert _listeners(conn) == 1
        standby.kill("first")
        ids = schedule_calls(conn, seeded, 5)
        wait_until(lambda: _dialed_once(sim, ids), timeout=60, what="the standby claiming")
        assert _listeners(conn) == 1
        standby.start_beat()
        wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")
    finally:
        standby.stop()

    assert status_counts(conn, ids) == {"completed": 5}
    assert _dialed_once(sim, ids)
    assert slots_held(conn) == 0


def test_beat_listens_when_told_to(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    """``CALLQ_LISTEN_IN=beat``: the worker does not listen; beat's listener sends a poll per
    wake-up (its periodic poll is a minute away, so the calls are not claimed by that)."""
    env = {**fleet.env, "CALLQ_LISTEN_IN": "beat", "CALLQ_POLL_INTERVAL_SECONDS": "60"}
    old = Fleet(env=env, log_dir=fleet.log_dir)
    try:
        old.start_worker()
        old.start_beat()
        wait_until(lambda: _listeners(conn) == 1, timeout=60, what="beat listening")
        ids = schedule_calls(conn, seeded, 5)
        wait_until(lambda: _dialed_once(sim, ids), timeout=60, what="each call dialed")
        wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")
    finally:
        old.stop()
    assert fleet.log_dir is not None
    assert "listener.started" in (fleet.log_dir / "beat.log").read_text(errors="replace")
    assert "listener.started" not in (fleet.log_dir / "worker.log").read_text(errors="replace")
    assert status_counts(conn, ids) == {"completed": 5}
    assert slots_held(conn) == 0
