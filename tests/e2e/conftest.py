"""End-to-end fixtures: real worker and beat processes, real PostgreSQL and broker, simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from providers.simulator import Simulator
from tests.conftest import running_simulator
from worker.fleet import Fleet
from worker.seed import Seeded, seed_demo

FAST_ENV = {
    "CALLQ_POLL_INTERVAL_SECONDS": "0.5",
    "CALLQ_TRACK_INITIAL_DELAY_SECONDS": "0.2",
    "CALLQ_TRACK_MAX_DELAY_SECONDS": "1",
    "CALLQ_RECONCILE_DELAY_SECONDS": "0.5",
    "CALLQ_HEALTH_INTERVAL_SECONDS": "1",
    "CALLQ_REAPER_INTERVAL_SECONDS": "1",
    "CALLQ_LEASE_SECONDS": "5",
    # a create (and its answer) fits in the lease: the throttle may wait 5 - 1 - 2 = 2 s
    "CALLQ_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
    "CALLQ_HTTP_READ_TIMEOUT_SECONDS": "2",
    "CALLQ_LOG_LEVEL": "INFO",
    # The simulator listens on a loopback port picked per test.
    "CALLQ_PROVIDER_ALLOWED_HOSTS": "http://127.0.0.1:*",
}
TERMINAL = ("completed", "failed", "canceled")


@pytest.fixture
def broker_url(redis_url: str) -> Iterator[str]:
    """A Redis database of its own for this test's broker traffic, emptied before and after."""
    url = redis_url.rsplit("/", 1)[0] + "/7"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    config = {
        "seed": 1,
        "outcome_mix": {"completed": 1.0},
        "queue_seconds": 0.05,
        "ring_seconds": 0.1,
        "call_seconds": [0.2, 0.6],
    }
    with running_simulator(config) as simulator:
        yield simulator


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("UPDATE ops_settings SET retry_delay_scale = 0.002")
        yield connection


@pytest.fixture
def seeded(conn: psycopg.Connection[Any], sim: Simulator) -> Seeded:
    return seed_demo(conn, sim_base_url=sim.base_url, max_concurrent_calls=10)


@pytest.fixture
def fleet(db_url: str, broker_url: str, tmp_path: Path) -> Iterator[Fleet]:
    procs = Fleet(
        env={"DATABASE_URL": db_url, "CALLQ_BROKER_URL": broker_url, **FAST_ENV},
        log_dir=tmp_path / "logs",
    )
    yield procs
    procs.stop()
    for log in sorted((tmp_path / "logs").glob("*.log")):
        print(f"--- {log.name} (tail) ---")
        print("\n".join(log.read_text(errors="replace").splitlines()[-30:]))


def status_counts(conn: psycopg.Connection[Any], ids: list[Any]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT status, count(*) FROM call_queue WHERE id = ANY(%s) GROUP BY status", (ids,)
    ).fetchall()
    return {str(k): int(v) for k, v in rows}


def all_terminal(conn: psycopg.Connection[Any], ids: list[Any]) -> bool:
    counts = status_counts(conn, ids)
    return sum(counts.get(k, 0) for k in TERMINAL) == len(ids)


def slots_held(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(sum(current_calls), 0) FROM provider_load")
    value = row.fetchone()
    return int(value[0]) if value else 0


def creates_by_queue(sim: Simulator) -> dict[str, int]:
    return {str(k): int(v) for k, v in sim.stats().get("creates_by_queue", {}).items()}
