"""Reconcile adopts a call only on proof: another tenant's call to the same number is never
taken as ours, and without proof the call is not dialed again (real database, simulator)."""

from __future__ import annotations

import dataclasses

import psycopg

from dispatch.request import build_call_request
from dispatch.steps import Ended, Outcome, Placed, Reconciling
from providers.simulator import Simulator
from worker import runtime, tasks
from worker.seed import Seeded, schedule_calls
from worker.settings import get_settings


def test_reconcile_never_adopts_a_call_without_proof(
    worker_db: str, seeded: Seeded, sim: Simulator
) -> None:
    sim.configure(
        {
            "synthflow_echo_variables": False,  # SynthFlow's list shows no correlation id
            "outcome_mix": {"completed": 1.0},
            "call_seconds": 600,
            # our create times out and never lands: its outcome is unknown to the worker
            "outages": [{"start": 0, "end": 3600, "mode": "timeout", "provider": "synthflow"}],
            "timeout_seconds": 0.05,
            "timeout_creates_call": False,
        }
    )
    with psycopg.connect(worker_db, autocommit=True) as conn:
        conn.execute(
            "UPDATE call_service_providers SET is_active = false WHERE id = %s",
            (seeded.provider_ids["vapi"],),
        )
        [queue_id] = schedule_calls(conn, seeded, 1)
    [assigned] = runtime.database().claim_and_assign(1, "test", 60)
    aid = str(assigned.assignment_id)
    [step] = tasks.dispatch_chunk([aid])
    assert isinstance(step, Reconciling)
    sim.configure({"outages": []})

    # Another tenant's call to the same person, through the same agent, after our dial.
    call = runtime.database().load_call(aid)
    assert call is not None
    theirs = dataclasses.replace(
        build_call_request(call), correlation_id="someone-elses-assignment", queue_id="theirs"
    )
    their_handle = runtime.provider_for(call.provider).create_call(theirs)

    lookups = get_settings().reconcile_lookups
    steps = [tasks.reconcile_one(aid, n) for n in range(lookups)]
    assert not any(isinstance(s, Placed) for s in steps)  # the old main adopted their call
    assert steps[-1] == Ended(Outcome.FAILED)  # not redialed: it may have rung already
    with psycopg.connect(worker_db) as conn:
        row = conn.execute(
            "SELECT a.provider_call_id, q.status, q.last_error FROM call_assignments a"
            " JOIN call_queue q ON q.id = a.queue_id WHERE a.id = %s",
            (aid,),
        ).fetchone()
        history = conn.execute(
            "SELECT count(*) FROM call_history WHERE provider_call_id = %s",
            (their_handle.provider_call_id,),
        ).fetchone()
    assert row is not None and row[0] is None and row[1] == "failed"
    assert "unproven" in row[2]
    assert history == (0,)  # their transcript and recording never became our history
    assert sim.stats().get("creates_by_queue", {}).get(str(queue_id), 0) == 0
