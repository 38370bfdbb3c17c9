"""Fleet-wide provider limits: four worker processes together never exceed a provider's create
rate (the simulator records each create's time), and every call still ends."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from providers.simulator import Simulator
from tests.e2e.conftest import all_terminal, slots_held
from worker.embedded import wait_until
from worker.fleet import Fleet
from worker.seed import schedule_calls, seed_demo

pytestmark = pytest.mark.e2e

RATE = 4  # creates per second for the whole fleet


def _fleet_rate_run(conn: psycopg.Connection[Any], sim: Simulator, fleet: Fleet, n: int) -> None:
    seeded = seed_demo(conn, sim_base_url=sim.base_url, providers=("synthflow",),
                       max_concurrent_calls=50)  # fmt: skip
    conn.execute(
        "UPDATE call_service_providers SET config = config || %s::jsonb",
        (json.dumps({"creates_per_second": RATE}),),
    )
    ids = schedule_calls(conn, seeded, n)
    for i in range(4):
        fleet.start_worker(f"w{i}", concurrency=8)
    fleet.start_beat()
    wait_until(lambda: all_terminal(conn, ids), timeout=60 + n, what="every call terminal")
    times = sorted(t["wall"] for ts in sim.stats(times=True)["create_times"].values() for t in ts)
    assert len(times) >= n
    # At most RATE creates in any window of one second, allowing one slot (1/RATE s) for the
    # time between a reservation and its request reaching the simulator.
    for i in range(len(times) - RATE):
        assert times[i + RATE] - times[i] >= 1.0 - 1.0 / RATE, (i, times[i : i + RATE + 1])
    assert slots_held(conn) == 0


def test_four_workers_share_one_create_rate(
    conn: psycopg.Connection[Any], sim: Simulator, fleet: Fleet
) -> None:
    _fleet_rate_run(conn, sim, fleet, 16)


@pytest.mark.slow
def test_four_workers_share_one_create_rate_long(
    conn: psycopg.Connection[Any], sim: Simulator, fleet: Fleet
) -> None:
    _fleet_rate_run(conn, sim, fleet, 120)
