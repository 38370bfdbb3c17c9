"""A create waiting in the client-side throttle is never reconciled or failed over while it
waits: with a low creates-per-second and a short lease, every call is created exactly once
(the simulator's own count per queue id), and every call ends."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from providers.simulator import Simulator
from tests.e2e.conftest import all_terminal, creates_by_queue, slots_held
from worker.embedded import wait_until
from worker.fleet import Fleet
from worker.seed import Seeded, schedule_calls

pytestmark = pytest.mark.e2e


def test_throttled_creates_are_never_dialed_twice(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    conn.execute(
        "UPDATE call_service_providers SET is_active = (id = %s),"
        " config = config || '{\"creates_per_second\": 0.5}'",
        (seeded.provider_ids["synthflow"],),
    )
    # lease 6 s, a create may take 1 + 2 s: the throttle may wait 3 s; six calls need 12 s
    fleet.env = {**fleet.env, "CALLQ_LEASE_SECONDS": "6"}
    ids = schedule_calls(conn, seeded, 6)
    fleet.start_worker()
    fleet.start_beat()
    wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")

    creates = creates_by_queue(sim)
    assert {str(i) for i in ids} <= set(creates)
    assert max(creates.values()) == 1, creates  # the old main dialed some twice
    released = conn.execute(
        "SELECT count(*) FROM call_assignments WHERE state = 'released' AND error = ANY(%s)",
        (["client_throttle", "fleet_rate_limit"],),
    ).fetchone()
    # the bound did act: the fleet-wide pacing (or a client throttle) released calls undialed
    assert released is not None and released[0] > 0
    assert slots_held(conn) == 0
