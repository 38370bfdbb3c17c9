"""The worker's per-call steps, run in this process against a real database and the simulator.

No worker process: each test claims a call with the real SQL, runs the step functions of
``worker.tasks`` directly and checks the step value they return and the rows they leave.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import psycopg
import pytest
import redis
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from bench.fairness import add_tenant
from dispatch.steps import (
    Ended,
    NextPoll,
    Outcome,
    Placed,
    Polling,
    Reconciling,
    Skipped,
    SkipReason,
    Step,
)
from dispatch.steps import tally as tally_of
from models import queries
from providers.base import CallState, CallStatus, WebhookEvent
from providers.simulator import Simulator
from tests.conftest import broker_messages
from worker import runtime, tasks
from worker.celery_app import app
from worker.embedded import wait_until
from worker.seed import Seeded, schedule_calls
from worker.settings import get_settings

ANSWERED_AT_ONCE = {"outcome_mix": {"completed": 1.0}, "answer_at_once": True}
LONG_CALLS = {"outcome_mix": {"completed": 1.0}, "call_seconds": 600}
SHORT_CALLS = {"outcome_mix": {"completed": 1.0}, "call_seconds": 1.0}


def claim(db_url: str, seeded: Seeded, count: int = 1) -> list[str]:
    """Schedule ``count`` calls and claim them; the assignment ids."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        schedule_calls(conn, seeded, count)
    assigned = runtime.database().claim_and_assign(count, "test-worker", 60)
    assert len(assigned) == count
    return [str(a.assignment_id) for a in assigned]


def dispatch(assignment_id: str) -> Step:
    [step] = tasks.dispatch_chunk([assignment_id])
    return step


def track(assignment_id: str, token: int | None) -> Step:
    [step] = tasks.track_chunk([(assignment_id, token)])
    return step


def call_state(db_url: str, assignment_id: str) -> tuple[str, str, int]:
    """(assignment state, queue status, slots held by every provider)."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT a.state, q.status, (SELECT sum(current_calls) FROM provider_load)"
            " FROM call_assignments a JOIN call_queue q ON q.id = a.queue_id WHERE a.id = %s",
            (assignment_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], int(row[2])


def queue_row(db_url: str, assignment_id: str) -> tuple[str, list[UUID], int]:
    """(queue status, excluded providers, attempts) of the call behind an assignment."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT q.status, q.excluded_provider_ids, q.attempts FROM call_queue q"
            " JOIN call_assignments a ON a.queue_id = q.id WHERE a.id = %s",
            (assignment_id,),
        ).fetchone()
    assert row is not None
    return row[0], list(row[1]), row[2]


def record_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements this process's database runs from now on, in order."""
    statements: list[str] = []
    run_once = queries.Database._run_once

    def record(db: queries.Database, query: str, params: Any) -> list[dict[str, Any]]:
        statements.append(query)
        return run_once(db, query, params)

    monkeypatch.setattr(queries.Database, "_run_once", record)
    return statements


def polls_due_now(db_url: str, seeded: Seeded, sim: Simulator, count: int) -> dict[str, int]:
    """``count`` long calls placed with their next poll due now: assignment id -> poll token."""
    sim.configure(LONG_CALLS)
    ids = claim(db_url, seeded, count)
    assert tally_of(tasks.dispatch_chunk(ids)) == {"placed": count}
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE call_assignments SET next_poll_at = now() WHERE id = ANY(%s)", (ids,))
        rows = conn.execute(
            "SELECT id::text, poll_count FROM call_assignments WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {str(a): int(t) for a, t in rows}


def test_placed_then_completed(worker_db: str, seeded: Seeded, sim: Simulator) -> None:
    sim.configure(ANSWERED_AT_ONCE)
    [aid] = claim(worker_db, seeded)
    step = dispatch(aid)
    assert isinstance(step, Placed) and step.first_poll.assignment_id == aid
    assert step.first_poll.token == 1  # the first poll's time is set with the token
    assert call_state(worker_db, aid) == ("placed", "in_progress", 1)

    assert track(aid, 1) == Ended(Outcome.COMPLETED)
    assert call_state(worker_db, aid) == ("completed", "completed", 0)
    with psycopg.connect(worker_db) as conn:
        history = conn.execute("SELECT status FROM call_history").fetchall()
    assert history == [("completed",)]
    # a second delivery of the same dispatch dials no one
    assert dispatch(aid) == Skipped(SkipReason.GATE_CLOSED)
    assert sim.stats()["total_creates"] == 1


def events_of(db_url: str, assignment_id: str) -> list[str]:
    """The event kinds of the call behind an assignment, in the order they were written."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT e.kind FROM call_events e JOIN call_assignments a ON a.queue_id = e.queue_id"
            " WHERE a.id = %s ORDER BY e.id",
            (assignment_id,),
        ).fetchall()
    return [r[0] for r in rows]


def test_ringing_and_in_progress_are_logged_once_each_before_the_end(
    worker_db: str, seeded: Seeded, sim: Simulator
) -> None:
    # long enough phases that polls every 50 ms see each one several times
    sim.configure(
        {
            "outcome_mix": {"completed": 1.0},
            "queue_seconds": 0.0,
            "ring_seconds": 1.5,
            "call_seconds": 1.5,
        }
    )
    [aid] = claim(worker_db, seeded)
    placed = dispatch(aid)
    assert isinstance(placed, Placed)
    token = placed.first_poll.token
    polls = 0

    def poll_until_ended() -> bool:
        nonlocal token, polls
        step = track(aid, token)
        polls += 1
        kinds = events_of(worker_db, aid)
        # never a second event of a kind, however often the same state is seen
        assert kinds.count("ringing") <= 1 and kinds.count("in_progress") <= 1
        if isinstance(step, Polling):
            token = step.next_poll.token
            return False
        assert step == Ended(Outcome.COMPLETED)
        return True

    wait_until(poll_until_ended, timeout=30, interval=0.05, what="the call to end")
    assert polls > 10  # each phase was seen many times
    kinds = events_of(worker_db, aid)
    assert kinds.count("ringing") == 1 and kinds.count("in_progress") == 1
    assert kinds.index("placed") < kinds.index("ringing") < kinds.index("in_progress")
    assert kinds.index("in_progress") < kinds.index("ended")
    with psycopg.connect(worker_db) as conn:
        attempts = conn.execute(
            "SELECT DISTINCT e.attempt, e.assignment_id FROM call_events e"
            " WHERE e.kind IN ('ringing', 'in_progress')"
        ).fetchall()
    assert attempts == [(1, UUID(aid))]


def test_a_live_call_keeps_polling_and_a_stale_chain_stops(
    worker_db: str, seeded: Seeded, sim: Simulator
) -> None:
    sim.configure(LONG_CALLS)
    [aid] = claim(worker_db, seeded)
    assert isinstance(dispatch(aid), Placed)
    step = track(aid, 1)
    assert isinstance(step, Polling) and step.next_poll.token == 2 and step.next_poll.delay > 0
    # a poll that still holds token 1 (a tick that took the call again) is superseded
    assert track(aid, 1) == Skipped(SkipReason.SUPERSEDED)
    assert call_state(worker_db, aid) == ("placed", "in_progress", 1)


def test_outcome_unknown_then_found(worker_db: str, seeded: Seeded, sim: Simulator) -> None:
    # The create lands, but the answer is a 504: the worker cannot know whether it did.
    sim.configure(
        {
            **LONG_CALLS,
            "outages": [{"start": 0, "end": 3600, "mode": "timeout", "provider": "vapi"}],
            "timeout_seconds": 0.05,
            "timeout_creates_call": True,
        }
    )
    [aid] = claim(worker_db, seeded)
    step = dispatch(aid)
    assert isinstance(step, Reconciling) and (step.assignment_id, step.lookup) == (aid, 0)
    assert call_state(worker_db, aid)[0] == "dialing"

    sim.configure({"outages": []})
    assert tasks.reconcile_one(aid, 0) == Placed(NextPoll(aid, 1, 0.0))  # due now
    assert call_state(worker_db, aid) == ("placed", "in_progress", 1)
    assert sim.stats()["total_creates"] == 1  # found, never sent again


def test_outcome_unknown_then_failed_over(worker_db: str, seeded: Seeded, sim: Simulator) -> None:
    sim.configure(
        {
            "outages": [{"start": 0, "end": 3600, "mode": "timeout", "provider": "vapi"}],
            "timeout_seconds": 0.05,
            "timeout_creates_call": False,
        }
    )
    [aid] = claim(worker_db, seeded)
    assert isinstance(dispatch(aid), Reconciling)
    sim.configure({"outages": []})
    steps = [tasks.reconcile_one(aid, n) for n in range(3)]
    assert steps[:2] == [Reconciling(aid, 1, 5.0), Reconciling(aid, 2, 5.0)]
    assert steps[2] == Ended(Outcome.RETRY_SCHEDULED)
    status, excluded, _ = queue_row(worker_db, aid)
    assert status == "queued" and excluded == [seeded.provider_ids["vapi"]]
    assert sim.stats()["total_creates"] == 0
    # the retry (made due now) goes to the other provider
    with psycopg.connect(worker_db, autocommit=True) as conn:
        conn.execute("UPDATE call_queue SET scheduled_time = now()")
    [retry] = runtime.database().claim_and_assign(1, "test-worker", 60)
    assert retry.provider_id == seeded.provider_ids["synthflow"]


def test_error_before_any_request_fails_over_without_reconciling(
    worker_db: str, seeded: Seeded, sim: Simulator
) -> None:
    with psycopg.connect(worker_db, autocommit=True) as conn:
        conn.execute(
            "UPDATE call_service_providers SET api_key = 'env:CALLQ_SECRET_NOT_SET' WHERE id = %s",
            (seeded.provider_ids["vapi"],),
        )
    [aid] = claim(worker_db, seeded)
    assert dispatch(aid) == Ended(Outcome.RETRY_SCHEDULED)
    status, excluded, attempts = queue_row(worker_db, aid)
    assert (status, excluded, attempts) == ("queued", [seeded.provider_ids["vapi"]], 1)
    assert call_state(worker_db, aid)[2] == 0  # the slot is free again
    assert sim.stats()["total_creates"] == 0


def test_webhook_checks_the_call_once(worker_db: str, seeded: Seeded, sim: Simulator) -> None:
    sim.configure(SHORT_CALLS)
    [aid] = claim(worker_db, seeded)
    assert isinstance(dispatch(aid), Placed)
    call = runtime.database().load_call(aid)
    assert call is not None and call.provider_call_id
    provider_id = str(seeded.provider_ids["vapi"])
    reported = [[provider_id, call.provider_call_id], [provider_id, "no-such-call"]]
    assert tasks.webhook.run(reported) == {"checked": 1, "unknown_call": 1}

    simulated = sim.engine.get(call.provider_call_id)
    assert simulated is not None
    wait_until(lambda: simulated.phase(time.time()) == "ended", timeout=10, what="the call's end")
    assert tasks.webhook.run(reported[:1] * 2) == {"completed": 1}  # a repeated id: one read
    assert call_state(worker_db, aid) == ("completed", "completed", 0)


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    """The Celery app publishing to a database of the test Redis; its lists are the queues."""
    url = redis_url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    previous = app.conf.broker_url
    app.conf.broker_url = url
    app.close()
    app.amqp._producer_pool = None
    yield client
    app.conf.broker_url = previous
    app.close()
    app.amqp._producer_pool = None
    client.flushdb()


def queued(client: redis.Redis, queue: str) -> list[tuple[str, Any]]:
    return [(task, args) for task, args, _ in broker_messages(client, queue)]


def due_in(db_url: str, ids: list[str]) -> list[float]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM next_poll_at - now()) FROM call_assignments"
            " WHERE id = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
    return [float(r[0]) for r in rows]


def test_a_chunk_sets_its_first_polls_without_a_message_and_logs_its_task_id(
    worker_db: str, seeded: Seeded, sim: Simulator, broker: redis.Redis
) -> None:
    sim.configure(LONG_CALLS)
    ids = claim(worker_db, seeded, 3)
    with capture_logs(processors=[merge_contextvars]) as events:
        result = tasks.dispatch_batch.apply(args=(ids,), task_id="task-under-test").get()
    assert result == {"placed": 3}
    assert queued(broker, "track") == []  # the first polls are rows, read by the tick
    assert all(0 < due <= 2.0 for due in due_in(worker_db, ids))  # the first poll's delay
    placed = [e for e in events if e["event"] == "call.placed"]
    assert len(placed) == 3
    assert {e.get("task_id") for e in placed} == {"task-under-test"}
    assert {e.get("assignment_id") for e in placed} == set(ids)


def test_safety_net_polls_of_calls_placed_together_are_spread(
    worker_db: str, seeded: Seeded, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls whose provider reports their end by webhook, placed in one chunk, poll again
    within [interval, 1.25 interval), not all in the same tick."""
    monkeypatch.setattr(runtime, "expects_webhooks", lambda provider: True)
    sim.configure(LONG_CALLS)
    ids = claim(worker_db, seeded, 15)
    assert tally_of(tasks.dispatch_chunk(ids)) == {"placed": 15}
    interval = get_settings().track_webhook_delay_seconds
    delays = due_in(worker_db, ids)  # placed a moment ago
    assert all(interval - 1 <= d <= interval * 1.25 for d in delays), delays
    assert max(delays) - min(delays) > interval * 0.1  # spread over more than a few ticks


def test_a_lone_call_is_claimed_gated_and_placed_in_two_statements(
    worker_db: str,
    seeded: Seeded,
    sim: Simulator,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poll's claim passes a small claim's gates itself (claim_and_gate_calls), and the
    placement records the provider's id and the first poll together: a call that trickles in
    alone costs two statements, not four. A claim larger than a chunk goes through the chunk's
    gates as before."""
    sim.configure(LONG_CALLS)
    statements = record_statements(monkeypatch)
    with psycopg.connect(worker_db, autocommit=True) as conn:
        schedule_calls(conn, seeded, 1, start=700)  # the period's first dial makes its row
        assert tasks.poll() == 1
        schedule_calls(conn, seeded, 1, start=701)
        statements.clear()
        assert tasks.poll() == 1
        assert statements == [queries.CLAIM_AND_GATE, queries.MARK_PLACED]
        monkeypatch.setenv("CALLQ_DISPATCH_CHUNK_SIZE", "2")
        get_settings.cache_clear()
        schedule_calls(conn, seeded, 3, start=702)
        statements.clear()
        assert tasks.poll() == 3  # the first chunk here, the last call sent as a chunk
        assert statements == [queries.CLAIM_AND_GATE, queries.GATE_AND_LOAD, queries.MARK_PLACED]
        assert len(queued(broker, "dispatch")) == 1
    get_settings.cache_clear()
    assert sim.stats()["total_creates"] == 4
    with psycopg.connect(worker_db) as conn:
        placed = conn.execute(
            "SELECT count(*) FROM call_assignments WHERE state = 'placed' AND poll_count = 1"
            " AND next_poll_at > now()"
        ).fetchone()
    assert placed == (4,)


NO_PROVIDER = "00000000-0000-0000-0000-000000000000"


def test_reports_end_their_calls_a_few_at_a_time(
    worker_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of final reports is ended by CALLQ_WEBHOOK_END_THREADS endings at once (more
    only wait on each other's rows in the database), every report ended once."""
    limit = get_settings().webhook_end_threads
    # each ending waits until `limit` run at once: fewer threads break the barrier, more let
    # more than `limit` run together
    together = threading.Barrier(limit, timeout=10)
    running, most, lock = 0, 0, threading.Lock()
    ended: list[str] = []

    def end(item: tuple[Any, WebhookEvent]) -> Step:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        together.wait()
        with lock:
            running -= 1
            ended.append(item[1].provider_call_id)
        return Ended(Outcome.COMPLETED)

    monkeypatch.setattr(tasks, "_end_reported", end)
    ids = [f"c{n}" for n in range(5 * limit)]
    final = "end-of-call-report"
    done = CallState.COMPLETED
    reports = [(NO_PROVIDER, WebhookEvent(c, CallStatus(c, done), final)) for c in ids]
    steps = tasks.end_from_reports(reports)
    assert len(steps) == len(reports) and sorted(ended) == sorted(ids)
    assert most == limit


def test_a_final_report_ends_the_call_without_another_read(
    worker_db: str, seeded: Seeded, sim: Simulator
) -> None:
    sim.configure(LONG_CALLS)
    [aid] = claim(worker_db, seeded)
    assert isinstance(dispatch(aid), Placed)
    call = runtime.database().load_call(aid)
    assert call is not None and call.provider_call_id
    report = WebhookEvent(
        provider_call_id=call.provider_call_id,
        status=CallStatus(
            call.provider_call_id, CallState.COMPLETED, duration_seconds=61.0, answered=True
        ),
        event_type="end-of-call-report",
    )
    provider_id = str(seeded.provider_ids["vapi"])
    reads = sim.stats()["counters"].get("call_reads_vapi", 0)
    unknown = WebhookEvent("no-such-call", report.status, "end-of-call-report")
    ended = tasks.end_from_reports([(provider_id, report), (provider_id, unknown)])
    assert ended == [Ended(Outcome.COMPLETED), Skipped(SkipReason.UNKNOWN_CALL)]
    assert call_state(worker_db, aid) == ("completed", "completed", 0)
    assert sim.stats()["counters"].get("call_reads_vapi", 0) == reads
    with psycopg.connect(worker_db) as conn:
        assert conn.execute("SELECT duration_seconds FROM call_history").fetchall() == [(61,)]
    # the polling chain ends at its next poll, without a read
    assert track(aid, 0) == Skipped(SkipReason.NOT_PLACED)
    assert sim.stats()["counters"].get("call_reads_vapi", 0) == reads


def test_the_tracking_tick_polls_the_due_calls_in_one_task(
    worker_db: str, seeded: Seeded, sim: Simulator, broker: redis.Redis
) -> None:
    sim.configure(LONG_CALLS)
    ids = claim(worker_db, seeded, 3)
    assert tally_of(tasks.dispatch_chunk(ids)) == {"placed": 3}  # not a burst: defers nothing
    assert tasks.track_due.run() == {}  # nothing due yet
    with psycopg.connect(worker_db, autocommit=True) as conn:
        conn.execute("UPDATE call_assignments SET next_poll_at = now() WHERE id = %s", (ids[0],))
    assert tasks.track_due.run() == {"polling": 1}
    assert due_in(worker_db, ids[:1])[0] > 2.0  # the next poll, a longer wait away
    assert queued(broker, "track") == []


def test_while_placing_the_tick_leaves_the_polls_that_can_wait(
    worker_db: str, seeded: Seeded, sim: Simulator
) -> None:
    """A burst is placed before polls that can wait take its cores: while this process places
    a burst (a chunk of ``BURST_CALLS`` or more, and for a second after), its tick takes only
    polls overdue by ``track_defer_seconds``; then it takes every due one. Nothing is dropped:
    a deferred poll stays due. A call placed alone defers nothing."""
    sim.configure(LONG_CALLS)
    ids = claim(worker_db, seeded, 3)
    assert tally_of(tasks.dispatch_chunk(ids)) == {"placed": 3}
    defer = get_settings().track_defer_seconds
    assert defer > 0
    with psycopg.connect(worker_db, autocommit=True) as conn:
        for aid, overdue in zip(ids, (0.0, defer - 1.0, defer + 1.0), strict=True):
            conn.execute(
                "UPDATE call_assignments SET next_poll_at = now() - make_interval(secs => %s)"
                " WHERE id = %s",
                (overdue, aid),
            )
    with runtime.placing(1):
        assert not runtime.is_placing()  # calls trickling in
    with runtime.placing(runtime.BURST_CALLS):
        assert runtime.is_placing()
        assert tasks.track_due.run() == {"polling": 1}  # only the one overdue by more
    assert runtime.is_placing()  # the grace between a burst's chunks
    assert [d > 2.0 for d in due_in(worker_db, ids)] == [False, False, True]
    wait_until(lambda: not runtime.is_placing(), timeout=5, what="the placement's grace")
    assert tasks.track_due.run() == {"polling": 2}
    assert all(d > 2.0 for d in due_in(worker_db, ids))


@pytest.mark.parametrize("hand_back", [True, False])
def test_a_tick_that_fails_in_process_sends_its_chunk_on_as_a_message(
    worker_db: str,
    seeded: Seeded,
    sim: Simulator,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    hand_back: bool,
) -> None:
    """The leading worker's tracker (``hand_back``) runs the tick in process, where a failure
    is a log line: the chunk it took goes on as a ``track_batch`` message with the same poll
    tokens, which fails as a task (Flower shows it). Beat's own message fails as a task
    already and sends nothing more."""
    tokens = polls_due_now(worker_db, seeded, sim, 2)

    def broken(call: Any) -> Any:
        raise RuntimeError("the database refused the ending")

    monkeypatch.setattr(tasks, "_poll", broken)
    with pytest.raises(RuntimeError):
        tasks.track_due.run(hand_back=hand_back)
    sent = queued(broker, "track")
    if not hand_back:
        assert sent == []
        return
    [(name, args)] = sent
    assert name == "callq.track_batch"
    assert sorted(map(tuple, args[0])) == sorted(tokens.items())
    with pytest.raises(RuntimeError):  # the message's task meets the same failure
        tasks.track_batch.run(args[0])
    monkeypatch.undo()
    assert tally_of(tasks.track_chunk([(a, t) for a, t in tokens.items()])) == {"polling": 2}


def test_a_tick_takes_and_loads_its_chunk_in_one_statement_and_sends_the_rest(
    worker_db: str,
    seeded: Seeded,
    sim: Simulator,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tracking tick takes the chunk it polls itself and loads its calls in one statement
    (TAKE_DUE_CALLS: the tokens are the loaded rows' poll counts); beyond a full chunk it takes
    the rest as ids and tokens and sends them as ``track_batch`` messages."""
    tokens = polls_due_now(worker_db, seeded, sim, 3)
    ids = list(tokens)
    statements = record_statements(monkeypatch)
    monkeypatch.setattr(tasks, "POLL_CHUNK", 2)
    assert tasks.track_due.run() == {"polling": 2}
    assert statements[:2] == [queries.TAKE_DUE_CALLS, queries.TAKE_DUE_POLLS]
    assert queries.LOAD_CALLS not in statements
    assert statements[-1] == queries.TOUCH_POLLS
    [(name, args)] = queued(broker, "track")
    assert name == "callq.track_batch"
    [[sent_id, sent_token]] = args[0]
    assert tokens[sent_id] == sent_token
    polled = [a for a in ids if a != sent_id]
    assert all(d > 2.0 for d in due_in(worker_db, polled))  # their next polls, set
    assert tasks.track_batch.run(args[0]) == {"polling": 1}
    reads = sum(n for k, n in sim.stats()["counters"].items() if k.startswith("call_reads_"))
    assert reads == 3  # each call read once


def test_a_busy_listener_claims_a_small_batch_and_the_newcomer_first(
    worker_db: str,
    seeded: Seeded,
    sim: Simulator,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While calls the listener handed off are still being placed, its next wake-up claims
    ``listen_busy_batch_size`` calls, not a batch: a backlog's next slice is left to its
    chained polls, and a newcomer's call, first in the fair order, is among the few claimed."""
    monkeypatch.setenv("CALLQ_LISTEN_BUSY_BATCH_SIZE", "3")
    get_settings.cache_clear()
    sim.configure(LONG_CALLS)
    with psycopg.connect(worker_db, autocommit=True) as conn:
        schedule_calls(conn, seeded, 12, start=800)  # the backlog
        other, template = add_tenant(conn, cap=100)
        newcomer = conn.execute(
            "SELECT schedule_call(%s, %s, 'New', '+15557000001')", (other, template)
        ).fetchone()
    assert newcomer is not None
    release = threading.Event()
    runtime.submit("listen", release.wait, 30)  # an earlier hand-off still being placed
    try:
        assert tasks.poll(hand_off=True) == 3
    finally:
        release.set()
    wait_until(lambda: runtime.pending("listen") == 0, timeout=30)
    with psycopg.connect(worker_db) as conn:
        status = conn.execute("SELECT status FROM call_queue WHERE id = %s", newcomer).fetchone()
        left = conn.execute("SELECT count(*) FROM call_queue WHERE status = 'queued'").fetchone()
    assert status is not None and status[0] != "queued"
    assert left == (10,)
    assert queued(broker, "dispatch") == []  # no chained poll, no other chunk: nothing sent
    assert tasks.poll(hand_off=True) == 10  # idle again: a wake-up claims a whole batch
    wait_until(lambda: runtime.pending("listen") == 0, timeout=30)


def test_a_chunk_is_placed_in_its_claim_order(
    worker_db: str, seeded: Seeded, sim: Simulator
) -> None:
    """The gates go in id order (lock order); the creates in the chunk's own order, the rank
    the lane's threads take them by (gate_and_load returns the calls won in the order given)."""
    sim.configure(LONG_CALLS)
    ids = claim(worker_db, seeded, 12)
    order = list(reversed(sorted(ids)))
    seen: list[str] = []
    create = tasks._create

    def spy(call: Any) -> Any:
        seen.append(str(call.assignment_id))
        return create(call)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, "_create", spy)
        mp.setattr(
            runtime, "map_in_context", lambda fn, items, lane="dispatch": [fn(i) for i in items]
        )
        assert tally_of(tasks.dispatch_chunk(order)) == {"placed": 12}
    assert seen == order
