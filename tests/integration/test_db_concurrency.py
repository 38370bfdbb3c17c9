"""Many connections at once: no call claimed twice, slots never negative, above max, or leaked."""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg

from .dbutil import connect, make_provider, make_template, make_user, one

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

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "worker thread hung"
    if errors:
        raise errors[0]


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
    stop = threading.Event()
    violations: list[Any] = []
    assigned_ids: list[list[uuid.UUID]] = [[] for _ in range(WORKERS)]

    def watch() -> None:
        with connect(db_url) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT pa.provider_id, pa.current_calls, pa.available_slots,"
                    " p.max_concurrent_calls FROM provider_availability pa"
                    " JOIN call_service_providers p ON p.id = pa.provider_id"
                ).fetchall()
                for pid, cur, free, mx in rows:
                    if cur < 0 or free < 0 or cur > mx or cur + free != mx:
                        violations.append((pid, cur, free, mx))
                # the counters always equal the live assignments: nothing for reconcile to fix
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
            row = conn.execute(
                "SELECT current_calls, available_slots FROM provider_availability"
                " WHERE provider_id = %s",
                (pid,),
            ).fetchone()
            assert row == (0, maxima[pid])
        assert one(conn, "SELECT reconcile_provider_slots()") == 0  # nothing to fix: no leak
        # every finished call has exactly one history row; each was dialed once, and every dial
        # counts (billing model): released attempts were never dialed and gave nothing
        assert one(conn, "SELECT count(*) FROM call_history") == 300
        assert one(conn, "SELECT calls_made FROM user_call_usage") == 300
        assert one(conn, "SELECT minutes_reserved FROM user_call_usage") == 0
        assert one(conn, "SELECT reconcile_tenant_counters()") == 0  # counters equal a recount
        per_queue = one(
            conn,
            "SELECT max(n) FROM (SELECT count(*) AS n FROM call_assignments"
            " WHERE state IN ('completed', 'failed') GROUP BY queue_id) x",
        )
        assert per_queue == 1


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


def test_claim_and_assign_losing_a_slot_race_leaves_the_call_untouched(db_url: str) -> None:
    """The batch takes provider slots last; if another transaction takes them meanwhile, the
    batch is redone with the provider rows locked and the call stays queued, unchanged."""
    with connect(db_url) as conn:
        user = make_user(conn, call_limit=None, max_concurrent=100_000)
        tpl = make_template(conn, user)
        provider = make_provider(conn, max_calls=1)
        qid = one(conn, "SELECT schedule_call(%s, %s, 'R', '+15551234567')", (user, tpl))
        before = conn.execute("SELECT * FROM call_queue WHERE id = %s", (qid,)).fetchone()
    result: list[Any] = []
    with psycopg.connect(db_url) as rival, connect(db_url) as claimer, connect(db_url) as obs:
        # the rival takes the only slot but has not committed yet
        rival.execute(
            "UPDATE provider_availability SET current_calls = 1, available_slots = 0"
            " WHERE provider_id = %s",
            (provider,),
        )
        pid = one(claimer, "SELECT pg_backend_pid()")
        t = threading.Thread(
            target=lambda: result.append(
                claimer.execute("SELECT * FROM claim_and_assign_calls(10)").fetchall()
            )
        )
        t.start()
        # wait (with a deadline) until the claimer blocks on the rival's row lock
        waited = 0
        while one(obs, "SELECT wait_event_type IS DISTINCT FROM 'Lock' FROM pg_stat_activity"
                  " WHERE pid = %s", (pid,)):  # fmt: skip
            waited += 1
            assert waited < 10_000, "claimer never blocked"
            obs.execute("SELECT pg_sleep(0.001)")
        rival.commit()
        t.join(timeout=30)
    assert result == [[]]
    with connect(db_url) as conn:
        assert conn.execute("SELECT * FROM call_queue WHERE id = %s", (qid,)).fetchone() == before
        assert one(conn, "SELECT count(*) FROM call_assignments") == 0
        assert (
            one(
                conn,
                "SELECT (current_calls, available_slots)::text FROM provider_availability",
            )
            == "(1,0)"
        )
