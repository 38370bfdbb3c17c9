"""Retell end to end: real worker and beat processes dial the simulator's Retell API.

The template's call features (voicemail message, recording off) reach Retell's request as
``agent_override.agent`` settings; outcomes map to the right terminal states; nobody is dialed
twice and no provider slot stays held.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from providers.simulator import Simulator
from tests.e2e.conftest import all_terminal, creates_by_queue, slots_held, status_counts
from worker.embedded import wait_until
from worker.fleet import Fleet
from worker.seed import Seeded, schedule_calls, seed_demo

pytestmark = pytest.mark.e2e


@pytest.fixture
def retell_only(conn: psycopg.Connection[Any], sim: Simulator) -> Seeded:
    seeded = seed_demo(conn, sim_base_url=sim.base_url, providers=("retell",))
    conn.execute(
        "UPDATE call_templates SET voicemail_detection = true, voicemail_action = 'leave_message',"
        " voicemail_message = 'Please call us back', record_calls = false WHERE id = %s",
        (seeded.template_id,),
    )
    return seeded


def test_retell_calls_reach_their_terminal_states(
    conn: psycopg.Connection[Any], retell_only: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    sim.configure({"outcomes_by_suffix": {"9001": "busy", "9002": "failed_permanent"}})
    answered = schedule_calls(conn, retell_only, 4)
    busy = schedule_calls(conn, retell_only, 1, suffix="9001", start=200)
    invalid = schedule_calls(conn, retell_only, 1, suffix="9002", start=300)
    ids = answered + busy + invalid

    fleet.start_worker()
    fleet.start_beat()
    wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")

    assert status_counts(conn, ids) == {"completed": 4, "failed": 2}
    rows = conn.execute(
        "SELECT h.queue_id, h.status, h.provider_id, h.provider_call_id, h.duration_seconds"
        " FROM call_history h WHERE h.queue_id = ANY(%s)",
        (ids,),
    ).fetchall()
    by_id = {row[0]: row for row in rows}
    for qid in answered:
        _, status, provider_id, call_id, duration = by_id[qid]
        assert status == "completed" and provider_id == retell_only.provider_ids["retell"]
        assert call_id and duration is not None and duration > 0
    assert by_id[busy[0]][1] == "busy"
    dials = creates_by_queue(sim)
    assert all(dials.get(str(q)) == 1 for q in answered)
    assert dials.get(str(invalid[0])) == 1  # a permanent failure is not retried
    assert slots_held(conn) == 0

    sent = [c.request for c in sim.engine.calls.values() if c.provider == "retell"]
    agent = sent[0]["agent_override"]["agent"]
    assert agent["voicemail_option"] == {
        "action": {"type": "static_text", "text": "Please call us back"}
    }
    assert agent["data_storage_setting"] == "basic_attributes_only"
    assert {c["metadata"]["callq_queue_id"] for c in sent} == {str(q) for q in ids}
    assert all(c["retell_llm_dynamic_variables"]["company_name"] == "Acme Inc" for c in sent)
