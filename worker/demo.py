"""``callq demo``: the whole system on one machine, against the provider simulator.

Applies migrations, seeds a user, plan, template and two providers, schedules a batch of calls
(some now, some later, mixed priorities), runs a real Celery worker and beat, prints live progress
and ends with a summary by status and provider. With no DATABASE_URL or broker URL configured it
starts an embedded PostgreSQL and Redis and stops them at the end.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from models.migrate import upgrade
from providers.simulator import Simulator
from worker.embedded import EmbeddedServices
from worker.fleet import Fleet
from worker.seed import Seeded, schedule_calls, seed_demo
from worker.settings import get_settings
from worker.status import format_table

TERMINAL = ("completed", "failed", "canceled")
# Outcomes the simulator gives each call: mostly answered, some busy / no answer / voicemail.
DEMO_SIM_CONFIG: dict[str, Any] = {
    "outcome_mix": {
        "completed": 0.7,
        "busy": 0.1,
        "no_answer": 0.1,
        "voicemail": 0.05,
        "failed": 0.05,
    },
    "call_seconds": [1.0, 4.0],
    "ring_seconds": 0.5,
}
# Fast demo settings: tick every second, poll calls often, retry unanswered calls after seconds.
DEMO_ENV = {
    "CALLQ_POLL_INTERVAL_SECONDS": "1",
    "CALLQ_TRACK_INITIAL_DELAY_SECONDS": "0.5",
    "CALLQ_TRACK_MAX_DELAY_SECONDS": "2",
    "CALLQ_RECONCILE_DELAY_SECONDS": "1",
    "CALLQ_HEALTH_INTERVAL_SECONDS": "5",
    "CALLQ_REAPER_INTERVAL_SECONDS": "5",
    "CALLQ_LOG_LEVEL": "WARNING",
}


@contextmanager
def services() -> Iterator[tuple[str, str]]:
    """The configured database and broker URLs, or embedded ones for the duration."""
    s = get_settings()
    embedded = EmbeddedServices()
    try:
        db = s.database_url or _say("starting embedded PostgreSQL", embedded.database_url)
        broker = s.broker_url or _say("starting embedded Redis", embedded.broker_url)
        yield db, broker
    finally:
        embedded.stop()


def run_demo(*, calls: int = 40, timeout: float = 180.0, seed: int = 7) -> int:
    """Run the demo; 0 when every call reached a terminal state in time."""
    with services() as (db_url, broker_url):
        applied = upgrade(db_url)
        print(f"migrations: {len(applied)} applied")
        sim = Simulator(config={**DEMO_SIM_CONFIG, "seed": seed})
        sim.start(port=0)
        fleet = Fleet(
            env={
                "DATABASE_URL": db_url,
                "CALLQ_BROKER_URL": broker_url,
                # the simulator is not an official provider host: ops allow it explicitly
                "CALLQ_PROVIDER_ALLOWED_HOSTS": sim.base_url,
                **DEMO_ENV,
            },
            log_dir=Path(
                os.environ.get("CALLQ_DEMO_LOGS") or tempfile.mkdtemp(prefix="callq-demo-logs-")
            ),
        )
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                _retry_fast(conn)
                seeded = seed_demo(conn, sim_base_url=sim.base_url, max_concurrent_calls=8)
                ids = _schedule(conn, seeded, calls, random.Random(seed))
                print(f"scheduled {len(ids)} calls (some now, some in 5-20 s, priorities 1-9)")
                fleet.start_worker()
                fleet.start_beat()
                ok = _watch(conn, ids, timeout)
                print()
                print(summary(conn, ids))
                print(f"\nsimulator: {sim.stats().get('total_creates', 0)} create requests")
            return 0 if ok else 1
        finally:
            fleet.stop()
            sim.stop()


def _retry_fast(conn: psycopg.Connection[Any]) -> None:
    """Make handle_failed_call's backoff seconds instead of minutes for this demo database."""
    conn.execute("SELECT set_config('callq.retry_delay_scale', '0.01', false)")
    dbname = conn.execute("SELECT current_database()").fetchone()
    assert dbname is not None
    conn.execute(f"ALTER DATABASE \"{dbname[0]}\" SET callq.retry_delay_scale = '0.01'")


def _schedule(
    conn: psycopg.Connection[Any], seeded: Seeded, calls: int, rng: random.Random
) -> list[Any]:
    ids: list[Any] = []
    for i in range(calls):
        later = rng.random() < 0.3
        ids += schedule_calls(
            conn,
            seeded,
            1,
            start=i,
            priority=rng.randint(1, 9),
            delay_seconds=rng.uniform(5, 20) if later else 0.0,
        )
    return ids


def _watch(conn: psycopg.Connection[Any], ids: list[Any], timeout: float) -> bool:
    """Print a progress line whenever the counts change; True once every call is terminal."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        counts = dict(
            conn.execute(
                "SELECT status, count(*) FROM call_queue WHERE id = ANY(%s) GROUP BY status",
                (ids,),
            ).fetchall()
        )
        line = "  ".join(f"{k}={counts[k]}" for k in sorted(counts))
        if line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        done = sum(counts.get(k, 0) for k in TERMINAL)
        if done == len(ids):
            return True
        if time.monotonic() > deadline:
            print(f"timed out with {len(ids) - done} calls not terminal", file=sys.stderr)
            return False
        time.sleep(0.5)


def summary(conn: psycopg.Connection[Any], ids: list[Any]) -> str:
    """Calls by final status and provider, with attempts, minutes and cost."""
    rows = conn.execute(
        """
        SELECT q.status, coalesce(h.status, '-') AS outcome, coalesce(p.name, '-') AS provider,
               count(*) AS calls,
               sum(q.attempts) AS attempts, coalesce(sum(h.duration_seconds), 0) AS seconds,
               coalesce(sum(h.cost), 0) AS cost
        FROM call_queue q
        LEFT JOIN call_history h ON h.queue_id = q.id
        LEFT JOIN call_service_providers p ON p.id = h.provider_id
        WHERE q.id = ANY(%s)
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        """,
        (ids,),
    ).fetchall()
    slots = conn.execute("SELECT coalesce(sum(current_calls), 0) FROM provider_availability")
    held = slots.fetchone()
    table = format_table(
        ["status", "outcome", "provider", "calls", "attempts", "seconds", "cost $"], rows
    )
    return f"Summary\n{table}\nprovider slots still held: {held[0] if held else 0}"


def _say(message: str, start: Any) -> str:
    print(f"{message}...", flush=True)
    return str(start())
