"""Calling rules with a real worker and beat against the simulator, on the test clock.

Calls to Tokyo at 03:00 local wait (queued, moved to 08:00) while London's go out; when the
clock reaches Tokyo's opening they are placed. A number listed as do-not-call after it was
queued is never dialed; a number over its attempt cap is not redialed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from providers.simulator import Simulator
from tests.e2e.conftest import creates_by_queue, slots_held, status_counts
from tests.integration.dbutil import SHIPPED_CALLING_RULES, set_clock
from worker.embedded import wait_until
from worker.fleet import Fleet
from worker.seed import Seeded

pytestmark = pytest.mark.e2e

TOKYO_NIGHT = datetime(2026, 7, 15, 3, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # London: 19:00
TOKYO_OPENS = datetime(2026, 7, 15, 8, 0, tzinfo=ZoneInfo("Asia/Tokyo"))


def _schedule(conn: psycopg.Connection[Any], seeded: Seeded, phone: str) -> Any:
    row = conn.execute(
        "SELECT schedule_call(%s, %s, 'Customer', %s)", (seeded.user_id, seeded.template_id, phone)
    ).fetchone()
    assert row is not None
    return row[0]


def _held(conn: psycopg.Connection[Any], ids: list[Any], rule: str, until: datetime) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM call_queue WHERE id = ANY(%s) AND status = 'queued'"
        " AND hold_reason = %s AND scheduled_time = %s",
        (ids, rule, until),
    ).fetchone()
    return bool(row and row[0] == len(ids))


def test_calls_wait_for_their_window_and_listed_numbers_are_never_dialed(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, fleet: Fleet
) -> None:
    conn.execute(SHIPPED_CALLING_RULES)
    set_clock(conn, TOKYO_NIGHT)
    sim.configure({"outcomes_by_suffix": {"9001": "busy"}})
    tokyo = [_schedule(conn, seeded, f"+8131234567{i}") for i in range(3)]
    london = [_schedule(conn, seeded, f"+4420794600{i:02d}") for i in range(3)]
    listed = _schedule(conn, seeded, "+442079460099")
    conn.execute("SELECT add_do_not_call('+442079460099', 'asked to stop')")  # global list
    # one attempt per number per day on this plan; the number answers busy
    conn.execute(
        "UPDATE subscription_plans SET contact_attempts_per_24h = 1 WHERE id = %s",
        (seeded.plan_id,),
    )
    capped = _schedule(conn, seeded, "+442079469001")  # the simulator answers busy (suffix)

    fleet.start_worker()
    fleet.start_beat()
    wait_until(
        lambda: status_counts(conn, london) == {"completed": 3},
        timeout=90,
        what="London's calls completed",
    )
    wait_until(
        lambda: _held(conn, tokyo, "calling_window", TOKYO_OPENS),
        timeout=30,
        what="Tokyo's calls held until 08:00 Tokyo time",
    )
    wait_until(
        lambda: status_counts(conn, [listed]) == {"canceled": 1},
        timeout=30,
        what="the listed number's call canceled",
    )
    wait_until(
        lambda: _held(
            conn, [capped], "attempt_cap", _first_attempt(conn, capped) + timedelta(hours=24)
        ),
        timeout=60,
        what="the busy number held by its attempt cap",
    )
    creates = creates_by_queue(sim)
    assert all(creates.get(str(q), 0) == 0 for q in [*tokyo, listed])
    assert creates.get(str(capped)) == 1

    # the window opens
    set_clock(conn, TOKYO_OPENS)
    wait_until(
        lambda: status_counts(conn, tokyo) == {"completed": 3},
        timeout=90,
        what="Tokyo's calls completed once their window opened",
    )
    dialed_at = conn.execute(
        "SELECT min(c.attempted_at) FROM contact_attempts c JOIN call_assignments a"
        " ON a.id = c.assignment_id WHERE a.queue_id = ANY(%s)",
        (tokyo,),
    ).fetchone()
    assert dialed_at is not None and dialed_at[0] >= TOKYO_OPENS
    creates = creates_by_queue(sim)
    assert [creates.get(str(q), 0) for q in tokyo] == [1, 1, 1]
    assert creates.get(str(listed), 0) == 0 and creates.get(str(capped)) == 1
    assert status_counts(conn, [capped]) == {"queued": 1}
    wait_until(lambda: slots_held(conn) == 0, timeout=30, what="every provider slot freed")


def _first_attempt(conn: psycopg.Connection[Any], qid: Any) -> datetime:
    row = conn.execute(
        "SELECT min(c.attempted_at) FROM contact_attempts c JOIN call_assignments a"
        " ON a.id = c.assignment_id WHERE a.queue_id = %s",
        (qid,),
    ).fetchone()
    return row[0] if row and row[0] else datetime.max.replace(tzinfo=ZoneInfo("UTC"))
