"""Maintenance tasks run in-process against a real database: health checks and the circuit."""

from __future__ import annotations

from typing import Any

import psycopg

from providers.simulator import Simulator
from worker.seed import Seeded


def availability(db_url: str, provider_id: Any) -> tuple[Any, ...]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT status, consecutive_failures, coalesce(circuit_open_until > now(), false),"
            " latency_ms IS NOT NULL"
            " FROM provider_availability WHERE provider_id = %s",
            (provider_id,),
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_failing_provider_opens_its_circuit_and_is_probed_back(
    worker_db: str, seeded: Seeded, sim: Simulator
) -> None:
    from worker.tasks import health_check

    vapi = seeded.provider_ids["vapi"]
    synthflow = seeded.provider_ids["synthflow"]
    health_check.run()
    assert availability(worker_db, vapi) == ("online", 0, False, True)

    sim.configure({"outages": [{"start": 0, "end": 3600, "mode": "500", "provider": "vapi"}]})
    for _ in range(5):
        health_check.run()
    status, failures, circuit_open, _ = availability(worker_db, vapi)
    assert failures == 5 and circuit_open and status == "degraded"
    assert availability(worker_db, synthflow)[:3] == ("online", 0, False)
    with psycopg.connect(worker_db) as conn:
        best = conn.execute("SELECT get_best_available_provider()").fetchone()
    assert best is not None and best[0] == synthflow  # out of rotation

    sim.configure({"outages": []})
    health_check.run()  # the probe goes on while the circuit is open
    assert availability(worker_db, vapi)[:3] == ("online", 0, False)


def test_reap_fixes_slot_counts(worker_db: str, seeded: Seeded) -> None:
    from worker.tasks import reap

    vapi = seeded.provider_ids["vapi"]
    with psycopg.connect(worker_db, autocommit=True) as conn:
        # three slots leaked (held by assignments that do not exist), stale figures
        conn.execute(
            "UPDATE provider_slots SET assignment_id = gen_random_uuid()"
            " WHERE provider_id = %s AND slot_no <= 3",
            (vapi,),
        )
        conn.execute(
            "UPDATE provider_availability SET current_calls = 3, available_slots = 7"
            " WHERE provider_id = %s",
            (vapi,),
        )
    assert reap.run()["slots_fixed"] == 3
    with psycopg.connect(worker_db) as conn:
        row = conn.execute(
            "SELECT l.current_calls, l.available_slots, pa.current_calls, pa.available_slots"
            " FROM provider_load l JOIN provider_availability pa USING (provider_id)"
            " WHERE provider_id = %s",
            (vapi,),
        ).fetchone()
    assert row is not None and tuple(row) == (0, 10, 0, 10)
