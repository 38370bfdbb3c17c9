"""Many connections at once: no call claimed twice, slots never over max, inconsistent or leaked."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from .dbutil import (
    connect,
    hold_slots,
    make_provider,
    make_template,
    make_user,
    one,
    schedule,
    slot_violations,
    slots,
)

WORKERS = 8


def _seed_calls(url: str, n: int) -> tuple[uuid.UUID, uuid.UUID]:
    with connect(url) as conn:
        user = make_user(conn, call_limit=None, max_concurrent=100_000)
        tpl = make_template(conn, user)
        conn.execute(
            "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone,"
            " priority, scheduled_time)"
            " SELECT %s, %s, 'R ' || i, '+1555' || lpad(i::text, 7, '0'), 1 + i %% 10,"
            " now() - (i || ' ms')::interval FROM generate_series(1, %s) AS i",
            (user, tpl, n),
        )
    return user, tpl


def _run_threads(target: Callable[[int], None], n: int = WORKERS) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def wrapped(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            target(i)
        except BaseException as exc:
            errors.append(exc)

    # daemons, and one deadline for all: a thread that died (a deadlock's victim) can leave the
    # others waiting for its calls; the test then fails in 120 s instead of hanging the run
    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "worker thread hung"


def test_eight_connections_claim_500_calls_each_exactly_once(db_url: str) -> None:
    _seed_calls(db_url, 500)
    claimed: list[list[uuid.UUID]] = [[] for _ in range(WORKERS)]

    def claim(i: int) -> None:
        with connect(db_url) as conn:
            while True:
                if i % 2:  # half use the batch form, half the single-call form
                    rows = conn.execute(
                        "SELECT queue_id FROM claim_due_calls(7, %s)", (f"w{i}",)
                    ).fetchall()
                else:
                    rows = conn.execute("SELECT queue_id FROM get_next_call_in_queue()").fetchall()
                if not rows:
                    return
                claimed[i].extend(r[0] for r in rows)

    _run_threads(claim)
    everything = [q for per in claimed for q in per]
    assert len(everything) == 500
    assert len(set(everything)) == 500, "a call was claimed twice"
    assert sum(1 for per in claimed if per) > 1  # the work really was shared
    with connect(db_url) as conn:
        assert one(conn, "SELECT count(*) FROM call_queue WHERE status = 'claimed'") == 500


def test_concurrent_assign_and_finish_keep_slots_exact(db_url: str) -> None:
    """Workers claim+assign, dial, and finish (complete / fail / release / duplicate reports) at
    once; a watcher checks the slot invariant throughout; at the end no slot is leaked."""
    _seed_calls(db_url, 300)
    with connect(db_url) as conn:
        providers = [
            make_provider(conn, max_calls=m, priority=p) for m, p in ((4, 1), (6, 1), (3, 2))
        ]
        maxima = dict(
            conn.execute("SELECT id, max_concurrent_calls FROM call_service_providers").fetchall()
        )
        # one provider dials from a pool of two numbers, each capped below the provider
        conn.execute(
            'UPDATE call_service_providers SET config = \'{"caller_ids": [{"id": "n1",'
            ' "max_concurrent": 2}, {"id": "n2", "max_concurrent": 3}]}\''
            " WHERE id = %s",
            (providers[1],),
        )
        maxima[providers[1]] = 5  # the pool's caps add up to 5 of its 6
    stop = threading.Event()
    violations: list[Any] = []
    assigned_ids: list[list[uuid.UUID]] = [[] for _ in range(WORKERS)]

    def watch() -> None:
        with connect(db_url) as conn:
            while not stop.is_set():
                # caps, slots equal to live assignments (one snapshot)
                violations.extend(slot_violations(conn))
                # the slots always hold exactly the live assignments: nothing for reconcile to fix
                fixed = one(conn, "SELECT reconcile_provider_slots()")
                if fixed:
                    violations.append(("reconcile fixed", fixed))

    def work(i: int) -> None:
        rng = random.Random(i)
        with connect(db_url) as conn:
            idle = 0
            while idle < 3:
                rows = conn.execute(
                    "SELECT queue_id, assignment_id FROM claim_and_assign_calls(%s, %s)",
                    (rng.randint(1, 8), f"w{i}"),
                ).fetchall()
                if not rows:
                    left = one(
                        conn,
                        "SELECT count(*) FROM call_queue WHERE status <> 'completed'"
                        " AND status <> 'failed'",
                    )
                    idle = idle + 1 if left == 0 else 0
                    continue
                for _, aid in rows:
                    assigned_ids[i].append(aid)
                    roll = rng.random()
                    if roll < 0.1:
                        conn.execute("SELECT release_assignment(%s, 'shutdown')", (aid,))
                        continue
                    assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is True
                    if roll < 0.7:
                        conn.execute("SELECT complete_call(%s, 30)", (aid,))
                        conn.execute("SELECT complete_call(%s, 30)", (aid,))  # duplicate
                    else:
                        conn.execute("SELECT handle_failed_call(%s, 'permanent')", (aid,))
                        conn.execute("SELECT handle_failed_call(%s, 'permanent')", (aid,))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        _run_threads(work)
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert not violations, violations[:5]
    all_assignments = [a for per in assigned_ids for a in per]
    assert len(all_assignments) == len(set(all_assignments))
    with connect(db_url) as conn:
        statuses = Counter(
            dict(conn.execute("SELECT status, count(*) FROM call_queue GROUP BY status").fetchall())
        )
        assert set(statuses) <= {"completed", "failed"} and sum(statuses.values()) == 300
        for pid in providers:
            assert slots(conn, pid) == (0, maxima[pid])
        assert one(conn, "SELECT reconcile_provider_slots()") == 0  # nothing to fix: no leak
        # the pool's numbers all dialed (rotation), and the reconcile refreshed the figures
        used = one(
            conn,
            "SELECT count(DISTINCT caller_id) FROM call_assignments WHERE provider_id = %s",
            (providers[1],),
        )
        assert used == 2
        figures = conn.execute(
            "SELECT current_calls, available_slots FROM provider_availability"
            " WHERE provider_id = %s",
            (providers[1],),
        ).fetchone()
        assert figures == (0, 5)
        # every finished call has exactly one history row; each was dialed once, and every dial
        # counts (billing model): released attempts were never dialed and gave nothing
        assert one(conn, "SELECT count(*) FROM call_history") == 300
        # (the exact figures: endings that raced for the period's row may still be pending)
        assert one(conn, "SELECT calls_made FROM user_call_usage_live") == 300
        assert one(conn, "SELECT minutes_reserved FROM user_call_usage_live") == 0
        assert one(conn, "SELECT reconcile_tenant_counters()") == 0  # counters equal a recount
        per_queue = one(
            conn,
            "SELECT max(n) FROM (SELECT count(*) AS n FROM call_assignments"
            " WHERE state IN ('completed', 'failed') GROUP BY queue_id) x",
        )
        assert per_queue == 1


def test_concurrent_gates_and_endings_bill_exactly_within_the_plan(db_url: str) -> None:
    """Eight connections claim, gate (dial_gates chunks) and end the calls of two tenants at
    once (one with call and minute limits, one without: both gate paths), with durations within
    each call's max duration, while a ninth folds pending endings and checks the exact figures
    (user_call_usage_live) throughout: dials never above call_limit, minutes billed plus
    reserved never above minute_limit. At the end, after beat's reconcile, nothing is pending
    and each period's row holds exactly the dials that passed the gate and the minutes the
    provider reported, rounded up per call; no tenant is billed for the other's calls."""
    call_limit, minute_limit = 120, 300
    with connect(db_url) as conn:
        limited = make_user(
            conn, call_limit=call_limit, minute_limit=minute_limit, max_concurrent=12
        )
        free = make_user(conn, call_limit=None, minute_limit=None, max_concurrent=12)
        make_provider(conn, max_calls=64)
        for user in (limited, free):
            # straight into the queue, more than the plan allows: the gate is the backstop
            conn.execute(
                "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone,"
                " scheduled_time) SELECT %s, %s, 'R ' || i, '+1555' || lpad(i::text, 7, '0'),"
                " now() FROM generate_series(1, 160) AS i",
                (user, make_template(conn, user)),
            )
    billed: dict[uuid.UUID, int] = {limited: 0, free: 0}
    lock = threading.Lock()
    stop = threading.Event()
    violations: list[Any] = []

    def watch() -> None:
        with connect(db_url) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM user_call_usage").fetchall()]
            while not stop.is_set():
                for usage_id in ids:  # one row per transaction, as the gates take them
                    conn.execute("SELECT fold_call_usage(%s)", (usage_id,))
                row = conn.execute(
                    "SELECT calls_made, minutes_used, minutes_reserved FROM user_call_usage_live"
                    " WHERE user_id = %s",
                    (limited,),
                ).fetchone()
                if row and (row[0] > call_limit or row[1] + row[2] > minute_limit):
                    violations.append(row)
                ids = [r[0] for r in conn.execute("SELECT id FROM user_call_usage").fetchall()]

    def work(i: int) -> None:
        rng = random.Random(i)
        with connect(db_url) as conn:
            empty = 0
            while empty < 3:
                rows = conn.execute(
                    "SELECT assignment_id FROM claim_and_assign_calls(%s, %s)",
                    (rng.randint(1, 6), f"w{i}"),
                ).fetchall()
                if not rows:
                    empty += 1
                    continue
                empty = 0
                won = conn.execute(
                    "SELECT g.assignment_id, g.max_duration_seconds, q.user_id"
                    " FROM dial_gates(%s::uuid[]) g"
                    " JOIN call_assignments a ON a.id = g.assignment_id"
                    " JOIN call_queue q ON q.id = a.queue_id WHERE g.won",
                    (sorted(str(r[0]) for r in rows),),
                ).fetchall()
                for aid, cap, user in won:
                    seconds = rng.uniform(0, cap or 900)
                    if rng.random() < 0.7:
                        conn.execute("SELECT complete_call(%s, %s)", (aid, seconds))
                    else:
                        conn.execute(
                            "SELECT handle_failed_call(%s, 'no_answer', NULL, NULL, %s)",
                            (aid, seconds),
                        )
                    minutes = one(
                        conn, "SELECT ceil(greatest(%s::float8, 0)::numeric / 60)::int", (seconds,)
                    )
                    with lock:
                        billed[user] += minutes

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        _run_threads(work)
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert not violations, violations[:5]
    with connect(db_url) as conn:
        assert (
            one(
                conn,
                "SELECT count(*) FROM call_assignments WHERE state IN"
                " ('assigned', 'dialing', 'placed')",
            )
            == 0
        )
        assert one(conn, "SELECT reconcile_tenant_counters()") == 0  # nothing to correct
        assert one(conn, "SELECT count(*) FROM user_call_usage_deltas") == 0  # all folded
        for user in (limited, free):
            row = conn.execute(
                "SELECT calls_made, minutes_used, minutes_reserved FROM user_call_usage"
                " WHERE user_id = %s",
                (user,),
            ).fetchone()
            dials = one(
                conn,
                "SELECT count(*) FROM call_assignments a JOIN call_queue q ON q.id = a.queue_id"
                " WHERE q.user_id = %s AND a.dialing_at IS NOT NULL AND a.state <> 'released'",
                (user,),
            )
            assert row == (dials, billed[user], 0)
        dials = one(conn, "SELECT calls_made FROM user_call_usage WHERE user_id = %s", (limited,))
        assert dials <= call_limit
        assert billed[limited] <= minute_limit
        assert billed[free] > 0


def test_concurrent_schedules_respect_the_call_limit(db_url: str) -> None:
    with connect(db_url) as conn:
        user = make_user(conn, call_limit=5)
        tpl = make_template(conn, user)
    results: list[str] = []

    def go(i: int) -> None:
        with connect(db_url) as conn:
            for _ in range(3):
                try:
                    conn.execute("SELECT schedule_call(%s, %s, 'R', '+15551234567')", (user, tpl))
                    results.append("ok")
                except psycopg.Error as exc:
                    results.append(str(exc.sqlstate))

    _run_threads(go)
    assert Counter(results) == {"ok": 5, "CQ003": WORKERS * 3 - 5}


def test_a_slot_locked_by_another_claimer_is_skipped_and_the_call_left_untouched(
    db_url: str,
) -> None:
    """Slots are taken with SKIP LOCKED: while another transaction holds a provider's only slot
    (not committed yet), both claim paths return at once without it and leave the call queued,
    unchanged; after that transaction rolls back the slot is taken normally."""
    with connect(db_url) as conn:
        user = make_user(conn, call_limit=None, max_concurrent=100_000)
        tpl = make_template(conn, user)
        provider = make_provider(conn, max_calls=1)
        qid = one(conn, "SELECT schedule_call(%s, %s, 'R', '+15551234567')", (user, tpl))
        before = conn.execute("SELECT * FROM call_queue WHERE id = %s", (qid,)).fetchone()
    with psycopg.connect(db_url) as rival, connect(db_url) as claimer:
        # a deadline instead of a hang if a claim ever waited on the rival's slot
        claimer.execute("SET statement_timeout = '20s'")
        hold_slots(rival, provider, 1)  # not committed
        assert claimer.execute("SELECT * FROM claim_and_assign_calls(10)").fetchall() == []
        assert one(claimer, "SELECT assign_call_to_provider(%s, %s)", (qid, provider)) is None
        assert claimer.execute("SELECT * FROM call_queue WHERE id = %s", (qid,)).fetchone() == (
            before
        )
        assert one(claimer, "SELECT count(*) FROM call_assignments") == 0
        rival.rollback()
        rows = claimer.execute("SELECT queue_id, provider_id FROM claim_and_assign_calls(10)")
        assert rows.fetchall() == [(qid, provider)]
        assert slots(claimer, provider) == (1, 0)
        assert slot_violations(claimer) == []


def _claim_wave(url: str, claimers: int, batch: int) -> list[Any]:
    """Each claimer claims in its own transaction, all kept open until every one has claimed
    (a claimer that waited on another's lock would fail on its lock_timeout); then all commit."""
    conns = [connect(url) for _ in range(claimers)]
    taken: list[Any] = []
    try:
        for i, conn in enumerate(conns):
            conn.execute("BEGIN")
            conn.execute("SET LOCAL lock_timeout = '5s'")
            rows = conn.execute(
                "SELECT queue_id FROM claim_due_calls(%s, %s, 60)", (batch, f"w{i}")
            ).fetchall()
            taken += [r[0] for r in rows]
        for conn in conns:
            conn.execute("COMMIT")
    finally:
        for conn in conns:
            conn.close()
    return taken


@pytest.mark.parametrize(("cap", "batch"), [(1, 1), (3, 1), (17, 1), (17, 5), (40, 3)])
def test_claimers_of_one_tenant_never_wait_and_hold_the_cap(
    db_url: str, cap: int, batch: int
) -> None:
    """Concurrent claims of one tenant take different counter stripes (no claimer waits on
    another's row), never exceed the plan's cap, and wave after wave fill it exactly."""
    with connect(db_url) as conn:
        user = make_user(conn, call_limit=None, max_concurrent=cap)
        tpl = make_template(conn, user)
        conn.execute(
            "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone,"
            " scheduled_time) SELECT %s, %s, 'R', '+1555' || lpad(i::text, 7, '0'),"
            " now() - interval '1 minute' FROM generate_series(1, 60) AS i",
            (user, tpl),
        )
    taken: list[Any] = []
    for _ in range(20):
        wave = _claim_wave(db_url, 8, batch)
        if not wave:
            break
        taken += wave
        assert len(taken) == len(set(taken)) <= cap
        if batch == 1 and cap >= 8 and len(taken) == len(wave):
            assert len(wave) == 8  # the first wave: every claimer got its own stripe
    with connect(db_url) as conn:
        flight = one(
            conn,
            "SELECT count(*) FROM call_queue WHERE user_id = %s AND status = 'claimed'",
            (user,),
        )
        assert flight == len(taken) == min(cap, 60)
        counted = one(
            conn,
            "SELECT sum(claimed + dialed) FROM tenant_call_counters WHERE user_id = %s",
            (user,),
        )
        assert counted == flight
        assert one(conn, "SELECT reconcile_tenant_counters()") == 0


def test_a_transaction_scheduling_one_by_one_takes_one_stripe_and_reconcile_never_waits(
    db_url: str,
) -> None:
    """An app transaction schedules calls one at a time (as a bulk SELECT schedule_call(...)
    does) while beat's reconcile runs: its calls count in one counter stripe, so it holds one
    row, and reconcile passes over the stripe in use instead of waiting for it (with random
    stripes the two took a tenant's rows in opposite orders and deadlocked)."""
    with connect(db_url) as conn:
        user = make_user(conn, call_limit=None, max_concurrent=50)
        tpl = make_template(conn, user)
        schedule(conn, user, tpl, recipient_phone="+15550000000")  # the tenant's stripes exist
    app, beat = connect(db_url), connect(db_url)
    try:
        app.execute("BEGIN")
        ids = [schedule(app, user, tpl, recipient_phone=f"+1555{i:07d}") for i in range(1, 13)]
        stripes = app.execute(
            "SELECT DISTINCT counter_stripe FROM call_queue WHERE id = ANY(%s)", (ids,)
        ).fetchall()
        assert len(stripes) == 1
        beat.execute("SET lock_timeout = '5s'")
        assert one(beat, "SELECT reconcile_tenant_counters()") == 0
        app.execute("COMMIT")
        counted = one(
            beat, "SELECT sum(queued) FROM tenant_call_counters WHERE user_id = %s", (user,)
        )
        assert counted == 13
        assert one(beat, "SELECT reconcile_tenant_counters()") == 0
    finally:
        app.close()
        beat.close()


def test_a_statement_chosen_as_a_deadlock_victim_runs_again(db_url: str) -> None:
    """The worker's statements run in transactions of their own; one PostgreSQL rolled back as
    a deadlock's victim is run again (up to DEADLOCK_ATTEMPTS times), and nothing else is."""
    from models.queries import DEADLOCK_ATTEMPTS, Database

    name = f"victim_{uuid.uuid4().hex[:8]}"
    with connect(db_url) as conn:
        conn.execute(f"CREATE SEQUENCE {name}_calls")
        conn.execute(
            f"CREATE FUNCTION {name}(p_fail integer) RETURNS bigint LANGUAGE plpgsql"
            " SET search_path = '' AS $$ DECLARE n bigint; BEGIN"
            f" n := nextval('public.{name}_calls');"
            " IF n <= p_fail THEN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END IF;"
            " RETURN n; END $$"
        )
    db = Database(db_url, max_size=1)
    try:
        assert db.scalar(f"SELECT {name}(%(fail)s)", {"fail": DEADLOCK_ATTEMPTS - 1}) == (
            DEADLOCK_ATTEMPTS
        )
        with pytest.raises(psycopg.errors.DeadlockDetected):
            db.scalar(f"SELECT {name}(%(fail)s)", {"fail": 2 * DEADLOCK_ATTEMPTS + 1})
        # any other error is not run again: the sequence moved once
        with connect(db_url) as conn:
            before = one(conn, f"SELECT last_value FROM {name}_calls")
        with pytest.raises(psycopg.errors.DivisionByZero):
            db.scalar(f"SELECT {name}(0) / 0")
        with connect(db_url) as conn:
            assert one(conn, f"SELECT last_value FROM {name}_calls") == before + 1
    finally:
        db.close()
        with connect(db_url) as conn:
            conn.execute(f"DROP FUNCTION {name}(integer)")
            conn.execute(f"DROP SEQUENCE {name}_calls")


def test_the_worker_pool_grows_on_demand_and_keeps_its_sessions(db_url: str) -> None:
    """A burst grows the pool to its size; the sessions it opened stay (the same server
    backends serve the next statements), and idleness never closes them: a new session plans
    every statement again."""
    from concurrent.futures import ThreadPoolExecutor

    from models.queries import Database

    db = Database(db_url, max_size=3)
    try:
        assert db.scalar("SELECT 1") == 1
        together = threading.Barrier(3, timeout=30)

        def session(_: int) -> int:
            # three threads hold a connection at once: the pool must grow to three
            with db._ensure_open().connection() as conn:
                together.wait()
                row = conn.execute("SELECT pg_backend_pid()").fetchone()
                assert row is not None
                return int(row[0])

        with ThreadPoolExecutor(3) as pool:
            pids = set(pool.map(session, range(3)))
        assert len(pids) == 3  # grown: three sessions at once
        stats = db._ensure_open().get_stats()
        assert stats["pool_size"] == 3
        assert db._ensure_open().max_idle >= 24 * 3600  # idleness never shrinks it
        later = {db.scalar("SELECT pg_backend_pid()") for _ in range(9)}
        assert later == pids  # the same sessions, none opened anew
    finally:
        db.close()
