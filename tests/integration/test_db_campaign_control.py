"""Campaign control in the database: draft, pause, resume and cancel against the claim and the
dial gate; reschedule_call; pacing (calls in flight, calls per minute) held across concurrent
claimers; close_campaigns."""

from __future__ import annotations

import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from .dbutil import Conn, as_role, connect, make_provider, make_template, make_user, one, schedule


def _campaign(conn: Conn, n: int, status: str = "running", **pacing: Any) -> tuple[Any, Any]:
    user = make_user(conn, call_limit=None)
    tpl = make_template(conn, user)
    camp = one(conn, "SELECT create_campaign(%s, %s, 'C', %s)", (user, tpl, status))
    if pacing:
        conn.execute(
            "SELECT set_campaign_pacing(%s, %s, %s)",
            (camp, pacing.get("per_minute"), pacing.get("in_flight")),
        )
    rows = [{"name": f"N{i}", "phone": f"+1555{i:07d}"} for i in range(n)]
    conn.execute("SELECT count(*) FROM schedule_calls(%s, %s)", (camp, Jsonb(rows)))
    return user, camp


def _claim(conn: Conn, n: int = 100) -> list[tuple[Any, Any, Any]]:
    return conn.execute("SELECT * FROM claim_and_assign_calls(%s, 't', 60)", (n,)).fetchall()


def _by_status(conn: Conn, camp: Any) -> dict[str, int]:
    rows = conn.execute(
        "SELECT status, count(*) FROM call_queue WHERE campaign_id = %s GROUP BY 1", (camp,)
    ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def test_draft_and_paused_calls_are_never_claimed(conn: Conn) -> None:
    make_provider(conn, max_calls=100)
    _, camp = _campaign(conn, 10, status="draft")
    assert _claim(conn) == []
    assert conn.execute("SELECT * FROM claim_due_calls(100)").fetchall() == []
    assert one(conn, "SELECT resume_campaign(%s)", (camp,)) == "running"
    assert len(_claim(conn, 4)) == 4
    assert one(conn, "SELECT pause_campaign(%s)", (camp,)) == "paused"
    # the 4 assigned but undialed calls went back to the queue, slots given back
    assert _by_status(conn, camp) == {"queued": 10}
    assert one(conn, "SELECT sum(current_calls) FROM provider_load") == 0
    assert _claim(conn) == [] and conn.execute("SELECT * FROM claim_due_calls(9)").fetchall() == []
    assert one(conn, "SELECT pause_campaign(%s)", (camp,)) == "paused"  # idempotent
    assert one(conn, "SELECT resume_campaign(%s)", (camp,)) == "running"
    assert len(_claim(conn)) == 10


def test_the_dial_gate_refuses_a_call_paused_after_its_claim(conn: Conn) -> None:
    make_provider(conn, max_calls=10)
    _, camp = _campaign(conn, 2)
    (q1, a1, _), (q2, a2, _) = _claim(conn)
    assert one(conn, "SELECT mark_call_dialing(%s)", (a1,)) is True
    # pause while the worker holds the second call's row: the pause skips it ...
    with connect(conn.info.dsn) as worker:
        with worker.transaction():
            worker.execute("SELECT 1 FROM call_queue WHERE id = %s FOR UPDATE", (q2,))
            assert one(conn, "SELECT pause_campaign(%s)", (camp,)) == "paused"
        # ... and the gate refuses it: released, back in the queue, never dialed
        assert one(worker, "SELECT mark_call_dialing(%s)", (a2,)) is False
    assert one(conn, "SELECT status FROM call_queue WHERE id = %s", (q2,)) == "queued"
    assert one(conn, "SELECT state FROM call_assignments WHERE id = %s", (a2,)) == "released"
    # the call being dialed finishes normally
    assert one(conn, "SELECT complete_call(%s, 30)", (a1,)) is not None
    assert one(conn, "SELECT status FROM call_queue WHERE id = %s", (q1,)) == "completed"


def test_cancel_cancels_what_is_not_dialed_and_lets_calls_in_flight_finish(conn: Conn) -> None:
    make_provider(conn, max_calls=3)
    _, camp = _campaign(conn, 8)
    claimed = _claim(conn)
    assert len(claimed) == 3
    (q1, a1, _), (_, a2, _), _ = claimed
    one(conn, "SELECT mark_call_dialing(%s)", (a1,))
    one(conn, "SELECT mark_call_dialing(%s)", (a2,))
    one(conn, "SELECT mark_call_placed(%s, 'p-2')", (a2,))
    assert one(conn, "SELECT cancel_campaign(%s)", (camp,)) == "canceled"
    assert _by_status(conn, camp) == {"canceled": 6, "dialing": 1, "in_progress": 1}
    assert one(conn, "SELECT calls_canceled FROM call_campaigns WHERE id = %s", (camp,)) == 6
    # a call in flight that fails is not retried: its campaign is canceled
    assert one(conn, "SELECT handle_failed_call(%s, 'busy')", (a1,)) == "retry_scheduled"
    assert one(conn, "SELECT status FROM call_queue WHERE id = %s", (q1,)) == "canceled"
    assert one(conn, "SELECT complete_call(%s, 12)", (a2,)) is not None
    assert _by_status(conn, camp) == {"canceled": 7, "completed": 1}
    assert one(conn, "SELECT sum(current_calls) FROM provider_load") == 0
    assert one(conn, "SELECT cancel_campaign(%s)", (camp,)) == "canceled"
    for fn in ("pause_campaign", "resume_campaign"):
        with pytest.raises(psycopg.Error) as err:
            conn.execute(f"SELECT {fn}(%s)", (camp,))  # type: ignore[arg-type]
        assert err.value.sqlstate == "CQ043"


def test_controls_act_only_on_the_callers_campaigns(conn: Conn) -> None:
    alice, camp = _campaign(conn, 1)
    bob = make_user(conn)
    for fn in ("pause_campaign", "resume_campaign", "cancel_campaign"):
        with as_role(conn, "authenticated", bob), pytest.raises(psycopg.Error) as err:
            conn.execute(f"SELECT {fn}(%s)", (camp,))  # type: ignore[arg-type]
        assert err.value.sqlstate == "CQ042"
        with as_role(conn, "anon"), pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"SELECT {fn}(%s)", (camp,))  # type: ignore[arg-type]
    with as_role(conn, "authenticated", alice):
        assert one(conn, "SELECT pause_campaign(%s)", (camp,)) == "paused"
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT set_campaign_pacing(%s, 0, NULL)", (camp,))
        assert err.value.sqlstate == "CQ046"
    # RLS: the owner reads the campaign; another user does not, nor an admin (a campaign is
    # its user's data: support tooling reads it as service_role)
    admin = make_user(conn, admin=True)
    for who, seen in ((alice, 1), (bob, 0), (admin, 0)):
        with as_role(conn, "authenticated", who):
            assert one(conn, "SELECT count(*) FROM call_campaigns WHERE id = %s", (camp,)) == seen
    with as_role(conn, "authenticated", alice):
        assert (
            conn.execute(
                "UPDATE call_campaigns SET name = 'renamed' WHERE id = %s", (camp,)
            ).rowcount
            == 1
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE call_campaigns SET status = 'running' WHERE id = %s", (camp,))


def test_reschedule_call(conn: Conn) -> None:
    make_provider(conn, max_calls=10)
    alice = make_user(conn)
    bob = make_user(conn)
    tpl = make_template(conn, alice)
    qid = schedule(conn, alice, tpl)
    later = datetime.now(UTC) + timedelta(hours=2)
    with as_role(conn, "authenticated", alice):  # rolled back at the end of the block
        assert one(conn, "SELECT reschedule_call(%s, %s)", (qid, later)) == later
        assert one(conn, "SELECT scheduled_time FROM call_queue WHERE id = %s", (qid,)) == later
        assert one(
            conn, "SELECT count(*) FROM call_events WHERE queue_id = %s AND kind = 'rescheduled'",
            (qid,),
        ) == 1  # fmt: skip
    for who, query_id, code in ((bob, qid, "CQ015"), (alice, uuid.uuid4(), "CQ015")):
        with as_role(conn, "authenticated", who), pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT reschedule_call(%s, now())", (query_id,))
        assert err.value.sqlstate == code
    # a claimed, undialed call is taken back and moved; slot given back
    conn.execute("SELECT reschedule_call(%s, NULL)", (qid,))
    ((_, aid, _),) = _claim(conn)
    conn.execute("SELECT reschedule_call(%s, %s)", (qid, later))
    assert one(conn, "SELECT status FROM call_queue WHERE id = %s", (qid,)) == "queued"
    assert one(conn, "SELECT sum(current_calls) FROM provider_load") == 0
    assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is False
    conn.execute("SELECT reschedule_call(%s, NULL)", (qid,))
    ((_, aid, _),) = _claim(conn)
    one(conn, "SELECT mark_call_dialing(%s)", (aid,))
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT reschedule_call(%s, %s)", (qid, later))
    assert err.value.sqlstate == "CQ017"
    one(conn, "SELECT complete_call(%s, 5)", (aid,))
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT reschedule_call(%s, %s)", (qid, later))
    assert err.value.sqlstate == "CQ016"


def test_max_in_flight_holds_across_concurrent_claimers(db_url: str) -> None:
    """Random claims, dials and ends from four connections; a sampler checks the campaign's
    calls in flight never exceed its limit, and everything is called in the end."""
    with connect(db_url) as conn:
        make_provider(conn, max_calls=50)
        _, camp = _campaign(conn, 60, in_flight=3)
        _, free = _campaign(conn, 30)  # an unpaced campaign alongside
    seen: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def sampler() -> None:
        with connect(db_url) as c:
            while not stop.is_set():
                seen.append(
                    one(
                        c,
                        "SELECT count(*) FROM call_queue WHERE campaign_id = %s AND status IN"
                        " ('claimed', 'assigned', 'dialing', 'in_progress')",
                        (camp,),
                    )
                )

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with connect(db_url) as c:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    for _, aid, _ in _claim(c, rnd.randint(1, 5)):
                        one(c, "SELECT mark_call_dialing(%s)", (aid,))
                        if rnd.random() < 0.3:
                            one(c, "SELECT handle_failed_call(%s, 'busy')", (aid,))
                            c.execute(
                                "UPDATE call_queue SET scheduled_time = now() WHERE id ="
                                " (SELECT queue_id FROM call_assignments WHERE id = %s)",
                                (aid,),
                            )
                        else:
                            one(c, "SELECT complete_call(%s, 1)", (aid,))
                    left = one(
                        c,
                        "SELECT count(*) FROM call_queue WHERE campaign_id IN (%s, %s)"
                        " AND status NOT IN ('completed', 'failed', 'canceled')",
                        (camp, free),
                    )
                    if left == 0:
                        return
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    s = threading.Thread(target=sampler)
    s.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    stop.set()
    s.join(10)
    assert not errors, errors
    assert seen and max(seen) <= 3
    with connect(db_url) as conn:
        for c in (camp, free):
            assert set(_by_status(conn, c)) <= {"completed", "failed"}, _by_status(conn, c)


def test_calls_per_minute_holds_across_concurrent_claimers(db_url: str) -> None:
    """60 calls per minute: one token a second, at most one banked. Four connections claim as
    fast as they can for ~2.5 s; at most 1 + 1 per elapsed second go."""
    with connect(db_url) as conn:
        make_provider(conn, max_calls=100)
        _campaign(conn, 50, per_minute=60)
    got: list[int] = []
    t0 = time.monotonic()

    def worker() -> None:
        with connect(db_url) as c:
            while time.monotonic() - t0 < 2.5:
                got.append(len(_claim(c, 10)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - t0
    assert 2 <= sum(got) <= 1 + int(elapsed) + 1


def test_close_campaigns_completes_and_ends(conn: Conn) -> None:
    make_provider(conn, max_calls=10)
    _, done = _campaign(conn, 2)
    for _, aid, _ in _claim(conn):
        one(conn, "SELECT mark_call_dialing(%s)", (aid,))
        one(conn, "SELECT complete_call(%s, 3)", (aid,))
    _, ending = _campaign(conn, 3, status="draft")
    conn.execute("UPDATE call_campaigns SET ends_at = now() WHERE id = %s", (ending,))
    assert one(conn, "SELECT close_campaigns()") == 2
    assert one(conn, "SELECT status FROM call_campaigns WHERE id = %s", (done,)) == "completed"
    assert _by_status(conn, ending) == {"canceled": 3}
    # more contacts reopen a completed campaign that has no end
    conn.execute(
        "SELECT * FROM schedule_calls(%s, %s)",
        (done, Jsonb([{"name": "More", "phone": "+15559990000"}])),
    )
    assert one(conn, "SELECT status FROM call_campaigns WHERE id = %s", (done,)) == "running"
    with pytest.raises(psycopg.Error) as err:
        conn.execute(
            "SELECT * FROM schedule_calls(%s, '[]')",
            (ending,),
        )
    assert err.value.sqlstate == "CQ043"


def test_progress_view_counts_outcomes_minutes_and_cost(conn: Conn) -> None:
    make_provider(conn, max_calls=10)
    user, camp = _campaign(conn, 5)
    (_, a1, _), (_, a2, _), (q3, a3, _), *_ = _claim(conn, 3)
    for aid in (a1, a2, a3):
        one(conn, "SELECT mark_call_dialing(%s)", (aid,))
    one(conn, "SELECT complete_call(%s, 61, NULL, NULL, 0.25)", (a1,))
    one(conn, "SELECT complete_call(%s, 30, NULL, NULL, 0.10)", (a2,))
    conn.execute("UPDATE call_queue SET max_attempts = 1 WHERE id = %s", (q3,))
    assert one(conn, "SELECT handle_failed_call(%s, 'busy')", (a3,)) == "failed"
    row = conn.execute(
        "SELECT calls, queued, in_flight, completed, failed, canceled, attempts, answered, busy,"
        " answer_rate, minutes, cost, first_call_at IS NOT NULL, last_call_at IS NOT NULL"
        " FROM call_campaign_progress WHERE campaign_id = %s",
        (camp,),
    ).fetchone()
    assert row is not None
    assert row[:9] == (5, 2, 0, 2, 1, 0, 3, 2, 1)
    assert float(row[9]) == pytest.approx(0.667)
    assert (int(row[10]), float(row[11]), row[12], row[13]) == (3, 0.35, True, True)
    other = make_user(conn)
    with as_role(conn, "authenticated", user):
        assert one(conn, "SELECT calls FROM call_campaign_progress") == 5
    with as_role(conn, "authenticated", other):
        assert conn.execute("SELECT * FROM call_campaign_progress").fetchall() == []
