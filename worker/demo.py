"""``callq demo``: the whole system on one machine, against the provider simulator.

Applies migrations, seeds a user, plan, template and three providers (Vapi, SynthFlow, Retell),
schedules a batch of calls (some now, some later, mixed priorities), runs a real Celery worker
and beat, prints live progress and ends with a summary by status and provider. One or two of
the calls go to a recipient zone where it is night now: the calling window holds them (they
stay queued until the local opening), as an illustration; the demo does not wait for them. With no
DATABASE_URL or broker URL configured it starts an embedded PostgreSQL and Redis and stops
them at the end.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from models.migrate import upgrade
from models.session import connect
from providers.simulator import Simulator
from worker.embedded import EmbeddedServices
from worker.fleet import Fleet
from worker.seed import Seeded, night_zone, schedule_calls, seed_demo
from worker.settings import get_settings
from worker.status import format_table

TERMINAL = ("completed", "failed", "canceled")
DEMO_PROVIDERS = ("vapi", "synthflow", "retell")
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


def run_demo(*, calls: int = 40, timeout: float = 180.0, seed: int = 7, keep: bool = False) -> int:
    """Run the demo; 0 when every call reached a terminal state in time. ``keep``: leave the
    stack running after the summary, with Flower and the metrics endpoint, until Ctrl-C."""
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
            with connect(db_url, pooled=get_settings().database_pooler, autocommit=True) as conn:
                _retry_fast(conn)
                seeded = seed_demo(
                    conn, sim_base_url=sim.base_url, providers=DEMO_PROVIDERS,
                    max_concurrent_calls=8,
                )  # fmt: skip
                ids, night = _schedule(conn, seeded, calls, random.Random(seed))
                print(
                    f"scheduled {len(ids)} calls (some now, some in 5-20 s, priorities 1-9;"
                    f" {len(night)} where it is night now)"
                )
                fleet.start_worker()
                fleet.start_beat()
                ok = _watch(conn, ids, night, timeout)
                print()
                print(summary(conn, ids))
                print(held_line(conn, night))
                print(f"\nsimulator: {sim.stats().get('total_creates', 0)} create requests")
            if keep:
                _keep_running(fleet, db_url)
            return 0 if ok else 1
        finally:
            fleet.stop()
            sim.stop()


def _keep_running(fleet: Fleet, db_url: str) -> None:
    """Start Flower and the metrics endpoint, say where they are, and wait for Ctrl-C."""
    flower_port, metrics_port = free_port(), free_port()
    cli = [sys.executable, "-m", "worker.cli"]
    fleet.start("flower", [*cli, "flower", f"--port={flower_port}", "--address=127.0.0.1"])
    fleet.start("metrics", [*cli, "metrics", "--host", "127.0.0.1", "--port", str(metrics_port)])
    print(
        "\nThe stack keeps running (worker, beat, simulator, Flower, metrics). Ctrl-C stops it.\n"
        f"  Flower:   http://127.0.0.1:{flower_port}\n"
        f"  metrics:  http://127.0.0.1:{metrics_port}/metrics\n"
        f"  queue:    DATABASE_URL='{db_url}' callq queue",
        flush=True,
    )
    try:
        while all(p.poll() is None for p in fleet.procs.values()):
            time.sleep(0.5)
        print("a process of the stack exited; stopping", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _retry_fast(conn: psycopg.Connection[Any]) -> None:
    """Make handle_failed_call's backoff seconds instead of minutes for this demo database
    (a table row, not a database setting: hosted Supabase refuses those, and a pooler loses a
    session's)."""
    conn.execute("UPDATE ops_settings SET retry_delay_scale = 0.01, updated_at = now()")


def night_calls(calls: int) -> int:
    """How many of the demo's calls go where it is night: two, one in a small demo, none in
    one of one or two calls."""
    return 0 if calls < 3 else 1 if calls < 10 else 2


def _schedule(
    conn: psycopg.Connection[Any], seeded: Seeded, calls: int, rng: random.Random
) -> tuple[list[Any], list[Any]]:
    """Schedule the calls: (every queue id, the ids of those where it is night now)."""
    ids: list[Any] = []
    for i in range(calls - night_calls(calls)):
        later = rng.random() < 0.3
        ids += schedule_calls(
            conn,
            seeded,
            1,
            start=i,
            priority=rng.randint(1, 9),
            delay_seconds=rng.uniform(5, 20) if later else 0.0,
        )
    night = schedule_calls(conn, seeded, night_calls(calls), start=len(ids), timezone=night_zone())
    return ids + night, night


def _watch(conn: psycopg.Connection[Any], ids: list[Any], night: list[Any], timeout: float) -> bool:
    """Print a progress line whenever the counts change; True once every call is terminal but
    the night ones, and those are held by the calling window (queued, ``hold_reason`` set)."""
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
        held = _held(conn, night)
        if done == len(ids) - len(night) and len(held) == len(night):
            return True
        if time.monotonic() > deadline:
            print(
                f"timed out with {len(ids) - len(night) - done} calls not terminal"
                f" and {len(night) - len(held)} night calls not held",
                file=sys.stderr,
            )
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


def _held(conn: psycopg.Connection[Any], ids: list[Any]) -> list[tuple[Any, ...]]:
    """Of these calls, those a rule holds: (hold reason, until, zones) of each."""
    if not ids:
        return []
    return conn.execute(
        "SELECT hold_reason, scheduled_time, recipient_timezones FROM call_queue"
        " WHERE id = ANY(%s) AND status = 'queued' AND hold_reason IS NOT NULL"
        " ORDER BY scheduled_time",
        (ids,),
    ).fetchall()


def held_line(conn: psycopg.Connection[Any], ids: list[Any]) -> str:
    """The summary's line on the calls a rule holds, with their local opening."""
    held = _held(conn, ids)
    if not held:
        return "held by a calling rule: 0 calls"
    reason, until, zones = held[0]
    zone = (zones or ["UTC"])[0]
    local = until.astimezone(ZoneInfo(zone))
    return (
        f"held by a calling rule: {len(held)} calls ({reason}) until {local:%H:%M}"
        f" {zone} ({until.astimezone(UTC):%Y-%m-%d %H:%M} UTC)"
    )


def _say(message: str, start: Any) -> str:
    print(f"{message}...", flush=True)
    return str(start())
