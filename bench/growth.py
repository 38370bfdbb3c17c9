"""Growth: claim and history latency with a small and a large table, same server, same run.

Both cases hold the same 100 due calls (priority 5) and the same history of one user (200 rows);
only the rest of the table grows. The rest of ``call_queue`` is 90 % finished (completed /
failed) and 10 % queued far ahead (1-365 days, priorities 1-10: those stay in the claim index);
all of it belongs to one large tenant. The rest of ``call_history`` is spread over 1,000 users.
Rows are bulk-inserted with ``INSERT ... SELECT generate_series`` (not through schedule_call).

Each measured statement runs in its own transaction that is rolled back, so every iteration sees
the same rows; the figure is the median client-side time of the statement (one client).

    claim single   SELECT * FROM get_next_call_in_queue()
    claim batch    SELECT count(*) FROM claim_and_assign_calls(50, 'bench', 60)
    history        the user's newest 50 history rows (as the table owner)
    history RLS    the same as role authenticated with the user's JWT claims (RLS policy)
    history API    as role authenticated with no WHERE (what PostgREST sends for
                   ``/call_history?order=created_at.desc&limit=50``): RLS alone filters
    schedule_call  one schedule_call for the large tenant (its plan has a call limit, so the
                   pending-call count runs)
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg

from bench.common import ScratchDB, log, median, percentile
from worker.seed import daytime_zone

HISTORY_SQL = (
    "SELECT id, recipient_name, status, started_at, duration_seconds, cost FROM call_history"
    " WHERE user_id = %s ORDER BY created_at DESC LIMIT 50"
)
HISTORY_RLS_SQL = (
    "SELECT id, recipient_name, status, started_at, duration_seconds, cost FROM call_history"
    " WHERE user_id = %s ORDER BY created_at DESC LIMIT 50"
)
# What PostgREST sends for ``/call_history?order=created_at.desc&limit=50``: no filter, RLS only.
HISTORY_API_SQL = (
    "SELECT id, recipient_name, status, started_at, duration_seconds, cost FROM call_history"
    " ORDER BY created_at DESC LIMIT 50"
)

QUEUE_BULK = """
INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone, status, priority,
                        scheduled_time, attempts, created_at, completed_at)
SELECT %(user_id)s, %(template_id)s, 'Old ' || g, '+1556' || lpad((g %% 10000000)::text, 7, '0'),
       CASE WHEN g %% 10 = 0 THEN 'queued' WHEN g %% 10 = 1 THEN 'failed' ELSE 'completed' END,
       1 + (g %% 7) %% 10,
       CASE WHEN g %% 10 = 0 THEN now() + interval '1 day' + (g %% 364) * interval '1 day'
            ELSE now() - interval '1 day' - (g %% 300) * interval '1 day' END,
       CASE WHEN g %% 10 = 0 THEN 0 ELSE 1 END,
       now() - interval '400 days' + g * interval '1 second',
       CASE WHEN g %% 10 = 0 THEN NULL ELSE now() - (g %% 300) * interval '1 day' END
FROM generate_series(1, %(n)s) g
"""
QUEUE_DUE = """
INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone, priority,
                        scheduled_time, created_at, recipient_timezones)
SELECT %(user_id)s, %(template_id)s, 'Due ' || g, '+1557' || lpad(g::text, 7, '0'), 5,
       now() - interval '5 minutes' + g * interval '1 millisecond', now() - interval '5 minutes',
       ARRAY[%(zone)s]
FROM generate_series(1, %(n)s) g
"""
HISTORY_BULK = """
INSERT INTO call_history (user_id, recipient_name, recipient_phone, status, started_at, ended_at,
                          duration_seconds, cost, attempts, created_at)
SELECT u.ids[1 + (g %% array_length(u.ids, 1))], 'Past ' || g,
       '+1558' || lpad((g %% 10000000)::text, 7, '0'),
       CASE WHEN g %% 5 = 0 THEN 'no_answer' ELSE 'completed' END,
       now() - g * interval '20 seconds', now() - g * interval '20 seconds' + interval '90 seconds',
       90, 0.12, 1, now() - g * interval '20 seconds'
FROM generate_series(1, %(n)s) g,
     (SELECT array_agg(id) AS ids FROM users WHERE email LIKE 'crowd-%%') u
"""
HISTORY_USER = """
INSERT INTO call_history (user_id, recipient_name, recipient_phone, status, started_at, ended_at,
                          duration_seconds, cost, attempts, created_at)
SELECT %(user_id)s, 'Mine ' || g, '+1559' || lpad(g::text, 7, '0'), 'completed',
       now() - g * interval '1 hour', now() - g * interval '1 hour' + interval '60 seconds', 60,
       0.10, 1, now() - g * interval '1 hour'
FROM generate_series(1, %(n)s) g
"""

DUE = 100
USER_HISTORY = 200


def _fill(url: str, size: int, seeded: Any) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE call_queue, call_history CASCADE")  # frees every provider slot
        conn.execute(
            "UPDATE provider_availability SET status = 'online', circuit_open_until = NULL"
        )
        ids = {"user_id": seeded.user_id, "template_id": seeded.template_id}
        conn.execute(QUEUE_DUE, {**ids, "n": DUE, "zone": daytime_zone()})  # in the window
        conn.execute(QUEUE_BULK, {**ids, "n": size - DUE})
        conn.execute(HISTORY_USER, {"user_id": seeded.user_id, "n": USER_HISTORY})
        conn.execute(HISTORY_BULK, {"n": size - USER_HISTORY})
        conn.execute("VACUUM ANALYZE call_queue")
        conn.execute("VACUUM ANALYZE call_history")
        conn.execute("VACUUM ANALYZE call_assignments")
        conn.execute("CHECKPOINT")


def _timed(
    conn: psycopg.Connection[Any],
    query: str,
    params: Any,
    iterations: int,
    setup: list[str] | None = None,
) -> list[float]:
    times = []
    for _ in range(iterations):
        with conn.transaction(force_rollback=True):
            for stmt in setup or []:
                conn.execute(stmt)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            conn.execute(query, params).fetchall()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def _measure(url: str, seeded: Any, iterations: int) -> dict[str, dict[str, float]]:
    claims = json.dumps({"sub": str(seeded.user_id), "role": "authenticated"})
    rls_setup = [
        "SET LOCAL ROLE authenticated",
        f"SELECT set_config('request.jwt.claims', '{claims}', true)",
    ]
    sched = (
        "SELECT schedule_call(%s, %s, 'Growth', '+15550001234', NULL, now() + interval '1 hour',"
        " 5, '{}'::jsonb, '{}'::jsonb)"
    )
    plans: dict[str, tuple[str, Any, list[str] | None]] = {
        "claim_single": ("SELECT * FROM get_next_call_in_queue()", None, None),
        "claim_batch50": (
            "SELECT count(*) FROM claim_and_assign_calls(50, 'bench', 60)",
            None,
            None,
        ),
        "history": (HISTORY_SQL, (seeded.user_id,), None),
        "history_rls": (HISTORY_RLS_SQL, (seeded.user_id,), rls_setup),
        "history_api_rls_only": (HISTORY_API_SQL, None, rls_setup),
        "schedule_call": (sched, (seeded.user_id, seeded.template_id), None),
    }
    out: dict[str, dict[str, float]] = {}
    with psycopg.connect(url) as conn:
        for name, (query, params, setup) in plans.items():
            try:
                _timed(conn, query, params, 5, setup)  # warm the caches and plans
                times = _timed(conn, query, params, iterations, setup)
            except psycopg.Error as exc:
                log(f"growth: {name} failed: {type(exc).__name__}: {exc}".splitlines()[0])
                conn.rollback()
                continue
            out[name] = {"median_ms": median(times), "p95_ms": percentile(times, 95)}
    return out


def run(*, quick: bool = False, admin_url: str | None = None) -> dict[str, Any]:
    from worker.seed import seed_demo

    sizes = (10_000, 200_000 if quick else 1_000_000)
    iterations = 60 if quick else 200
    db = ScratchDB(admin_url) if admin_url else ScratchDB()
    log(f"growth: scratch database {db.name}")
    db.create()
    results: dict[str, Any] = {"sizes": list(sizes), "iterations": iterations}
    try:
        with psycopg.connect(db.url, autocommit=True) as conn:
            seeded = seed_demo(
                conn,
                sim_base_url="http://127.0.0.1:9",
                max_concurrent_calls=1000,
                call_limit=100_000_000,
            )
            conn.execute(
                "INSERT INTO auth.users (email) SELECT 'crowd-' || g || '@example.com'"
                " FROM generate_series(1, 1000) g"
            )
        for size in sizes:
            t0 = time.monotonic()
            _fill(db.url, size, seeded)
            log(
                f"growth: filled {size:,} queue + {size:,} history rows in "
                f"{time.monotonic() - t0:.0f}s"
            )
            results[str(size)] = _measure(db.url, seeded, iterations)
            for name, v in results[str(size)].items():
                log(
                    f"growth: {size:>9,} {name:14s} median {v['median_ms']:.3f} ms "
                    f"p95 {v['p95_ms']:.3f} ms"
                )
    finally:
        db.drop()
    small, large = results[str(sizes[0])], results[str(sizes[1])]
    results["ratios"] = {
        name: large[name]["median_ms"] / small[name]["median_ms"]
        for name in small
        if name in large and small[name]["median_ms"] > 0
    }
    return results


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
