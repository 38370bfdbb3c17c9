"""Behaviour of the queue and provider functions, one transition at a time."""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .dbutil import (
    Conn,
    connect,
    free_slots,
    hold_slots,
    make_provider,
    make_template,
    make_user,
    one,
    schedule,
    slot_violations,
    slots,
)


@pytest.fixture
def setup(conn: Conn) -> tuple[uuid.UUID, uuid.UUID]:
    user = make_user(conn, call_limit=None)
    return user, make_template(conn, user)


def status(conn: Conn, qid: uuid.UUID) -> str:
    return str(one(conn, "SELECT status FROM call_queue WHERE id = %s", (qid,)))


def assigned_call(
    conn: Conn, setup: tuple[uuid.UUID, uuid.UUID], provider: uuid.UUID, **kw: Any
) -> tuple[uuid.UUID, uuid.UUID]:
    qid = schedule(conn, *setup, **kw)
    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (qid, provider))
    assert aid is not None
    return qid, aid


def placed_call(
    conn: Conn, setup: tuple[uuid.UUID, uuid.UUID], provider: uuid.UUID, **kw: Any
) -> tuple[uuid.UUID, uuid.UUID]:
    qid, aid = assigned_call(conn, setup, provider, **kw)
    assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is True
    assert one(conn, "SELECT mark_call_placed(%s, %s)", (aid, f"pc-{aid}")) is True
    return qid, aid


# --- the description's example, verbatim ----------------------------------------------------

EXAMPLE_PROVIDERS = """
INSERT INTO call_service_providers (name, provider_type, api_key, api_secret, base_url, max_concurrent_calls, priority)
VALUES 
  ('Vapi Production', 'vapi', 'your_vapi_key', 'your_vapi_secret', 'https://api.vapi.com', 10, 1),
  ('SynthFlow Production', 'synthflow', 'your_synthflow_key', 'your_synthflow_secret', 'https://api.synthflow.com', 10, 2);
"""  # noqa: E501, W291
EXAMPLE_AVAILABILITY = """
INSERT INTO provider_availability (provider_id, current_calls, available_slots, status)
SELECT id, 0, max_concurrent_calls, 'online'
FROM call_service_providers
WHERE is_active = TRUE;
"""
EXAMPLE_SCHEDULE = """
SELECT schedule_call(
  'user_uuid',
  'template_uuid',
  'John Doe',
  '+15551234567',
  'john@example.com',
  CURRENT_TIMESTAMP + INTERVAL '1 hour',
  3, -- priority
  '{"company_name": "Acme Inc"}', -- custom variables
  '{"source": "web_app"}' -- metadata
);
"""
EXAMPLE_PROCESS = """
-- Get next call
WITH next_call AS (
  SELECT * FROM get_next_call_in_queue()
),
best_provider AS (
  SELECT get_best_available_provider() AS provider_id
)
SELECT assign_call_to_provider(next_call.queue_id, best_provider.provider_id)
FROM next_call, best_provider
WHERE next_call.queue_id IS NOT NULL AND best_provider.provider_id IS NOT NULL;
"""


def test_service_integration_example_verbatim(
    conn: Conn, setup: tuple[uuid.UUID, uuid.UUID]
) -> None:
    user, tpl = setup
    conn.execute(EXAMPLE_PROVIDERS)  # type: ignore[arg-type]
    conn.execute(EXAMPLE_AVAILABILITY)  # type: ignore[arg-type]
    sql = EXAMPLE_SCHEDULE.replace("user_uuid", str(user)).replace("template_uuid", str(tpl))
    qid = one(conn, sql)
    # scheduled an hour ahead: nothing due yet
    assert conn.execute(EXAMPLE_PROCESS).fetchall() == []  # type: ignore[arg-type]
    conn.execute("UPDATE call_queue SET scheduled_time = now() - interval '1 second'")
    rows = conn.execute(EXAMPLE_PROCESS).fetchall()  # type: ignore[arg-type]
    assert len(rows) == 1 and rows[0][0] is not None
    provider = one(conn, "SELECT provider_id FROM call_assignments WHERE id = %s", (rows[0][0],))
    assert one(conn, "SELECT name FROM call_service_providers WHERE id = %s", (provider,)) == (
        "Vapi Production"
    )
    assert status(conn, qid) == "assigned"
    assert slots(conn, provider) == (1, 9)


# --- claiming ---------------------------------------------------------------------------------


def test_get_next_call_orders_by_priority_then_time(conn: Conn, setup: Any) -> None:
    now = datetime.now(UTC)
    late = schedule(conn, *setup, priority=5)
    urgent = schedule(conn, *setup, priority=1)
    conn.execute(
        "UPDATE call_queue SET scheduled_time = %s WHERE id = %s", (now - timedelta(hours=1), late)
    )
    early = schedule(conn, *setup, priority=5)
    conn.execute(
        "UPDATE call_queue SET scheduled_time = %s WHERE id = %s",
        (now - timedelta(hours=2), early),
    )
    schedule(conn, *setup, scheduled_time=now + timedelta(hours=1))  # not due
    got = [conn.execute("SELECT * FROM get_next_call_in_queue()").fetchall() for _ in range(4)]
    assert [r[0][0] for r in got[:3]] == [urgent, early, late]
    assert got[3] == []
    row = conn.execute(
        "SELECT status, lease_expires_at - claimed_at FROM call_queue WHERE id = %s", (urgent,)
    ).fetchone()
    default = one(conn, "SELECT default_lease_seconds()")
    assert row == ("claimed", timedelta(seconds=default))


def test_claim_due_calls_batch(conn: Conn, setup: Any) -> None:
    ids = {schedule(conn, *setup) for _ in range(5)}
    got = conn.execute("SELECT queue_id FROM claim_due_calls(3, 'w1', 30)").fetchall()
    assert len(got) == 3 and {r[0] for r in got} <= ids
    assert one(conn, "SELECT count(*) FROM call_queue WHERE claimed_by = 'w1'") == 3
    assert len(conn.execute("SELECT * FROM claim_due_calls(10)").fetchall()) == 2
    assert conn.execute("SELECT * FROM claim_due_calls(10)").fetchall() == []


def test_claim_skips_rows_locked_by_another_transaction(
    db_url: str, conn: Conn, setup: Any
) -> None:
    first = schedule(conn, *setup, priority=1)
    second = schedule(conn, *setup, priority=2)
    with psycopg.connect(db_url) as other:
        other.execute("SELECT id FROM call_queue WHERE id = %s FOR UPDATE", (first,))
        assert one(conn, "SELECT queue_id FROM get_next_call_in_queue()") == second


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), limit=st.sampled_from([1, 2, 5, 20, 50]))
def test_a_claim_walks_past_the_calls_concurrent_claimers_hold(
    db_url: str, conn: Conn, data: st.DataObject, limit: int
) -> None:
    """Concurrent claimers walk the same first candidates (a claim's span: its batch and as many
    again, at least 8 more). A claim whose span others hold, in part or whole, walks on past
    them, up to four spans, and takes the next calls in claim order, none of them held."""
    span = limit + max(limit, 8)
    calls = data.draw(st.integers(1, 3 * span + 10), label="calls")
    held = data.draw(st.integers(0, calls), label="held")
    user = make_user(conn, call_limit=None, max_concurrent=1000)
    template = make_template(conn, user)
    start = datetime.now(UTC) - timedelta(hours=1)
    ids = [
        schedule(conn, user, template, priority=1, scheduled_time=start + timedelta(seconds=i))
        for i in range(calls)
    ]
    try:
        with psycopg.connect(db_url) as other:  # a claimer holding the first calls, uncommitted
            other.execute("SELECT id FROM call_queue WHERE id = ANY(%s) FOR UPDATE", (ids[:held],))
            got = conn.execute(
                "SELECT queue_id FROM claim_due_calls(%s, 'w', 30)", (limit,)
            ).fetchall()
        assert sorted(r[0] for r in got) == sorted(ids[held : min(held + limit, 4 * span)])
    finally:  # no due call of this example is left for the next one's claim
        conn.execute("DELETE FROM call_queue WHERE user_id = %s", (user,))


# --- provider selection and assignment --------------------------------------------------------


def test_best_provider_prefers_priority_then_load_and_honours_filters(conn: Conn) -> None:
    a = make_provider(conn, priority=1, max_calls=2, capabilities={"sms": True})
    b = make_provider(conn, priority=2, max_calls=10)
    c = make_provider(conn, priority=2, max_calls=10)
    make_provider(conn, priority=1, active=False)
    make_provider(conn, priority=1, availability=False)
    assert one(conn, "SELECT get_best_available_provider()") == a
    hold_slots(conn, a, 2)  # a is full
    hold_slots(conn, b, 5)
    assert one(conn, "SELECT get_best_available_provider()") == c  # lower load
    assert one(conn, "SELECT get_best_available_provider(NULL, %s)", ([c],)) == b
    assert one(conn, "SELECT get_best_available_provider(NULL, %s)", ([b, c],)) is None
    assert one(conn, """SELECT get_best_available_provider('{"sms": true}')""") is None
    free_slots(conn, a)
    assert one(conn, """SELECT get_best_available_provider('{"sms": true}')""") == a
    conn.execute(
        "UPDATE provider_availability SET circuit_open_until = now() + interval '1 minute'"
        " WHERE provider_id = %s",
        (a,),
    )
    assert one(conn, """SELECT get_best_available_provider('{"sms": true}')""") is None
    conn.execute("UPDATE provider_availability SET circuit_open_until = NULL, status = 'offline'")
    assert one(conn, "SELECT get_best_available_provider()") is None


def test_assign_takes_a_slot_and_refuses_when_full_or_not_claimable(conn: Conn, setup: Any) -> None:
    p = make_provider(conn, max_calls=1)
    q1 = schedule(conn, *setup)
    q2 = schedule(conn, *setup)
    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (q1, p))
    assert aid is not None and status(conn, q1) == "assigned" and slots(conn, p) == (1, 0)
    row = conn.execute(
        "SELECT queue_id, provider_id, state, attempt FROM call_assignments WHERE id = %s", (aid,)
    ).fetchone()
    assert row == (q1, p, "assigned", 1)
    # full: NULL and nothing changed
    assert one(conn, "SELECT assign_call_to_provider(%s, %s)", (q2, p)) is None
    assert status(conn, q2) == "queued" and slots(conn, p) == (1, 0)
    # not claimable (already assigned): NULL
    p2 = make_provider(conn)
    assert one(conn, "SELECT assign_call_to_provider(%s, %s)", (q1, p2)) is None
    assert slots(conn, p2) == (0, 10)
    assert one(conn, "SELECT count(*) FROM call_assignments") == 1
    assert one(conn, "SELECT assign_call_to_provider(%s, %s)", (uuid.uuid4(), p2)) is None


def test_claim_and_assign_spreads_over_free_slots(conn: Conn, setup: Any) -> None:
    a = make_provider(conn, priority=1, max_calls=2)
    b = make_provider(conn, priority=2, max_calls=3)
    ids = [schedule(conn, *setup) for _ in range(7)]
    rows = conn.execute("SELECT * FROM claim_and_assign_calls(10, 'w1', 90)").fetchall()
    assert len(rows) == 5
    per = {a: 0, b: 0}
    for qid, aid, pid in rows:
        per[pid] += 1
        assert one(conn, "SELECT queue_id FROM call_assignments WHERE id = %s", (aid,)) == qid
    assert per == {a: 2, b: 3}
    assert slots(conn, a) == (2, 0) and slots(conn, b) == (3, 0)
    states = dict(conn.execute("SELECT id, status FROM call_queue").fetchall())
    assert sorted(states.values()) == ["assigned"] * 5 + ["queued"] * 2
    # the oldest calls went first; the rest stay queued and untouched
    assert {r[0] for r in rows} == set(ids[:5])
    untouched = conn.execute(
        "SELECT claimed_by, lease_expires_at FROM call_queue WHERE status = 'queued'"
    ).fetchall()
    assert untouched == [(None, None), (None, None)]
    lease = one(
        conn, "SELECT max(lease_expires_at - claimed_at) FROM call_queue WHERE claimed_by = 'w1'"
    )
    assert lease == timedelta(seconds=90)
    assert conn.execute("SELECT * FROM claim_and_assign_calls(10)").fetchall() == []


def test_claim_and_assign_honours_exclusions_and_capabilities(conn: Conn, setup: Any) -> None:
    a = make_provider(conn, priority=1, max_calls=5)
    b = make_provider(conn, priority=2, max_calls=5, capabilities={"spanish": True})
    excl = schedule(conn, *setup, priority=1)
    conn.execute("UPDATE call_queue SET excluded_provider_ids = %s WHERE id = %s", ([a], excl))
    cap = schedule(conn, *setup, priority=1)
    conn.execute(
        """UPDATE call_queue SET required_capabilities = '{"spanish": true}' WHERE id = %s""",
        (cap,),
    )
    impossible = schedule(conn, *setup, priority=1)
    conn.execute(
        """UPDATE call_queue SET required_capabilities = '{"klingon": true}' WHERE id = %s""",
        (impossible,),
    )
    plain = schedule(conn, *setup, priority=2)
    rows = conn.execute("SELECT queue_id, provider_id FROM claim_and_assign_calls(10)").fetchall()
    assert dict(rows) == {excl: b, cap: b, plain: a}
    assert status(conn, impossible) == "queued"
    assert slots(conn, a) == (1, 4) and slots(conn, b) == (2, 3)


def test_claim_and_assign_with_no_provider_leaves_calls_queued(conn: Conn, setup: Any) -> None:
    q = schedule(conn, *setup)
    before = conn.execute("SELECT * FROM call_queue WHERE id = %s", (q,)).fetchone()
    assert conn.execute("SELECT * FROM claim_and_assign_calls(10)").fetchall() == []
    p = make_provider(conn)
    conn.execute("UPDATE provider_availability SET status = 'offline' WHERE provider_id = %s", (p,))
    assert conn.execute("SELECT * FROM claim_and_assign_calls(10)").fetchall() == []
    assert conn.execute("SELECT * FROM call_queue WHERE id = %s", (q,)).fetchone() == before


# --- dialing and placing ----------------------------------------------------------------------


def test_mark_dialing_is_a_one_shot_gate(conn: Conn, setup: Any) -> None:
    p = make_provider(conn)
    qid, aid = assigned_call(conn, setup, p)
    assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is True
    assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is False
    assert one(conn, "SELECT mark_call_dialing(%s)", (uuid.uuid4(),)) is False
    row = conn.execute("SELECT status, attempts FROM call_queue WHERE id = %s", (qid,)).fetchone()
    assert row == ("dialing", 1)


def test_mark_placed(conn: Conn, setup: Any) -> None:
    p = make_provider(conn)
    qid, aid = assigned_call(conn, setup, p)
    assert one(conn, "SELECT mark_call_placed(%s, 'x')", (aid,)) is False  # not dialing yet
    one(conn, "SELECT mark_call_dialing(%s)", (aid,))
    assert one(conn, "SELECT mark_call_placed(%s, 'pc-1')", (aid,)) is True
    assert one(conn, "SELECT mark_call_placed(%s, 'pc-1')", (aid,)) is True  # same id: fine
    assert one(conn, "SELECT mark_call_placed(%s, 'pc-2')", (aid,)) is False
    row = conn.execute(
        "SELECT state, provider_call_id, next_poll_at > now() FROM call_assignments WHERE id = %s",
        (aid,),
    ).fetchone()
    assert row == ("placed", "pc-1", True)
    assert status(conn, qid) == "in_progress"


def test_mark_calls_placed_sets_each_first_poll_once(conn: Conn, setup: Any) -> None:
    p = make_provider(conn)
    (q1, a1), (q2, a2) = assigned_call(conn, setup, p), assigned_call(conn, setup, p)
    one(conn, "SELECT mark_call_dialing(%s)", (a1,))  # a2 is not dialing: nothing happens to it
    placed = "SELECT * FROM mark_calls_placed(%s::uuid[], %s::text[], %s::float8[])"
    rows = conn.execute(placed, ([a1, a2], ["pc-1", "pc-2"], [30.0, 5.0])).fetchall()
    assert rows == [(a1, 1)]  # placed, first poll set: token 1
    row = conn.execute(
        "SELECT state, provider_call_id, poll_count,"
        " next_poll_at - last_polled_at BETWEEN interval '29 s' AND interval '31 s'"
        " FROM call_assignments WHERE id = %s",
        (a1,),
    ).fetchone()
    assert row == ("placed", "pc-1", 1, True)
    assert (status(conn, q1), status(conn, q2)) == ("in_progress", "assigned")
    # a repeated request (the same provider id) keeps the call's polls: no new first poll
    assert conn.execute(placed, ([a1], ["pc-1"], [0.0])).fetchall() == []
    assert one(conn, "SELECT poll_count FROM call_assignments WHERE id = %s", (a1,)) == 1


def test_release_gives_the_slot_back_without_counting_an_attempt(conn: Conn, setup: Any) -> None:
    a = make_provider(conn, priority=1)
    b = make_provider(conn, priority=2)
    qid, aid = assigned_call(conn, setup, a)
    one(conn, "SELECT mark_call_dialing(%s)", (aid,))
    assert one(conn, "SELECT release_assignment(%s, 'provider_unavailable')", (aid,)) is True
    assert one(conn, "SELECT release_assignment(%s, 'provider_unavailable')", (aid,)) is False
    row = conn.execute(
        "SELECT status, attempts, excluded_provider_ids, lease_expires_at FROM call_queue"
        " WHERE id = %s",
        (qid,),
    ).fetchone()
    assert row == ("queued", 0, [a], None)
    assert slots(conn, a) == (0, 10)
    assert one(conn, "SELECT state FROM call_assignments WHERE id = %s", (aid,)) == "released"
    # the next claim fails over to b
    assert conn.execute(
        "SELECT queue_id, provider_id FROM claim_and_assign_calls()"
    ).fetchall() == [(qid, b)]
    # a plain release keeps the exclusions as they are
    aid2 = one(
        conn,
        "SELECT id FROM call_assignments WHERE queue_id = %s AND state = 'assigned'",
        (qid,),
    )
    assert one(conn, "SELECT release_assignment(%s, 'shutdown')", (aid2,)) is True
    assert one(conn, "SELECT excluded_provider_ids FROM call_queue WHERE id = %s", (qid,)) == [a]


# --- completion -------------------------------------------------------------------------------


def test_complete_call_writes_history_usage_stats_once(conn: Conn, setup: Any) -> None:
    user, tpl = setup
    p = make_provider(conn, max_calls=3)
    qid, aid = placed_call(conn, setup, p)
    assert slots(conn, p) == (1, 2)
    hid = one(
        conn,
        "SELECT complete_call(%s, 61, 'https://rec', 'hello', 0.25)",
        (aid,),
    )
    row = conn.execute(
        "SELECT user_id, template_id, queue_id, assignment_id, provider_id, status,"
        " duration_seconds, recording_url, transcript, cost, provider_call_id, started_at"
        " IS NOT NULL FROM call_history WHERE id = %s",
        (hid,),
    ).fetchone()
    assert row is not None
    assert row[:6] == (user, tpl, qid, aid, p, "completed")
    assert (float(row[6]), row[7], row[8], float(row[9]), row[10], row[11]) == (
        61.0,
        "https://rec",
        "hello",
        0.25,
        f"pc-{aid}",
        True,
    )
    assert slots(conn, p) == (0, 3)
    assert status(conn, qid) == "completed"
    usage = conn.execute("SELECT calls_made, minutes_used FROM user_call_usage").fetchall()
    assert usage == [(1, math.ceil(61 / 60))]
    stats = conn.execute(
        "SELECT total_calls, successful_calls, failed_calls FROM provider_availability"
    ).fetchone()
    assert stats == (1, 1, 0)
    # a duplicate webhook/poll: same id, nothing changes
    assert one(conn, "SELECT complete_call(%s, 300)", (aid,)) == hid
    assert one(conn, "SELECT handle_failed_call(%s, 'busy')", (aid,)) == "noop"
    assert slots(conn, p) == (0, 3)
    assert conn.execute("SELECT calls_made, minutes_used FROM user_call_usage").fetchall() == usage
    assert one(conn, "SELECT count(*) FROM call_history") == 1


def test_endings_count_provider_stats_without_waiting_for_its_row(
    db_url: str, conn: Conn, setup: Any
) -> None:
    """While another transaction holds the provider's row, endings do not wait for it: each is
    a pending tally, exact in provider_stats at once and folded in by reconcile_provider_slots."""
    p = make_provider(conn)
    done = [placed_call(conn, setup, p)[1] for _ in range(3)]
    failed = placed_call(conn, setup, p)[1]
    canceled = placed_call(conn, setup, p)[1]
    with psycopg.connect(db_url) as holder:
        holder.execute(
            "SELECT 1 FROM provider_availability WHERE provider_id = %s FOR UPDATE", (p,)
        )
        conn.execute("SET lock_timeout = '2s'")
        try:
            for aid in done:
                one(conn, "SELECT complete_call(%s, 30)", (aid,))
            assert one(conn, "SELECT handle_failed_call(%s, 'permanent')", (failed,)) == "failed"
            assert one(conn, "SELECT handle_failed_call(%s, 'canceled')", (canceled,)) == "canceled"
        finally:
            conn.execute("RESET lock_timeout")
        assert one(conn, "SELECT count(*) FROM provider_call_tallies") == 5
        assert conn.execute(
            "SELECT total_calls, successful_calls, failed_calls FROM provider_stats"
            " WHERE provider_id = %s",
            (p,),
        ).fetchone() == (5, 3, 1)
        # reconcile leaves the tallies of a row another transaction holds for its next run
        one(conn, "SELECT reconcile_provider_slots()")
        assert one(conn, "SELECT count(*) FROM provider_call_tallies") == 5
    one(conn, "SELECT reconcile_provider_slots()")
    assert one(conn, "SELECT count(*) FROM provider_call_tallies") == 0
    stats = "SELECT total_calls, successful_calls, failed_calls FROM {} WHERE provider_id = %s"
    for view in ("provider_availability", "provider_stats"):
        assert conn.execute(stats.format(view), (p,)).fetchone() == (5, 3, 1)


def test_usage_accumulates_in_the_current_period(conn: Conn, setup: Any) -> None:
    p = make_provider(conn)
    for duration in (1, 60, 121):
        _, aid = placed_call(conn, setup, p)
        one(conn, "SELECT complete_call(%s, %s)", (aid, duration))
    row = conn.execute(
        "SELECT u.calls_made, u.minutes_used, u.period_start = s.current_period_start"
        " FROM user_call_usage u JOIN user_subscriptions s ON s.user_id = u.user_id"
    ).fetchone()
    assert row == (3, 1 + 1 + 3, True)


def test_complete_call_errors(conn: Conn, setup: Any) -> None:
    with pytest.raises(psycopg.Error) as err:
        one(conn, "SELECT complete_call(%s)", (uuid.uuid4(),))
    assert err.value.sqlstate == "CQ011"
    p = make_provider(conn)
    _, aid = placed_call(conn, setup, p)
    # complete_call only completes; every other ending goes through handle_failed_call
    with pytest.raises(psycopg.Error) as err:
        one(conn, "SELECT complete_call(%s, p_status => 'busy')", (aid,))
    assert err.value.sqlstate == "42883"  # no such parameter
    assert slots(conn, p) == (1, 9)


# --- failures ---------------------------------------------------------------------------------


def _retry_delay(conn: Conn, qid: uuid.UUID) -> float:
    """The delay the retry was scheduled with: its due time against the failing transaction's
    own clock (``updated_at``), not against a later statement's, which has moved on by the
    time it runs (a slow machine read 14.99 s for a delay of at least 15)."""
    return float(
        one(
            conn,
            "SELECT extract(epoch FROM scheduled_time - updated_at) FROM call_queue WHERE id = %s",
            (qid,),
        )
    )


@pytest.mark.parametrize(
    ("kind", "low", "high"),
    [
        ("busy", 240, 360),
        ("no_answer", 240, 360),
        ("voicemail", 240, 360),
        ("provider_error", 24, 36),
        ("rate_limited", 15, 18),
    ],
)
def test_failure_schedules_a_retry_with_backoff(
    conn: Conn, setup: Any, kind: str, low: float, high: float
) -> None:
    a = make_provider(conn, priority=1)
    make_provider(conn, priority=2)
    qid, aid = placed_call(conn, setup, a)
    assert one(conn, "SELECT handle_failed_call(%s, %s, 'boom')", (aid, kind)) == "retry_scheduled"
    assert status(conn, qid) == "queued"
    assert low <= _retry_delay(conn, qid) <= high
    assert slots(conn, a) == (0, 10)
    retry = conn.execute(
        "SELECT queue_id, assignment_id, provider_id, attempt, reason, error,"
        " next_attempt_at IS NOT NULL FROM call_retries"
    ).fetchall()
    assert retry == [(qid, aid, a, 1, kind, "boom", True)]
    excluded = one(conn, "SELECT excluded_provider_ids FROM call_queue WHERE id = %s", (qid,))
    assert excluded == ([a] if kind == "provider_error" else [])
    assert one(conn, "SELECT count(*) FROM call_history") == 0
    # duplicate report: nothing more happens
    assert one(conn, "SELECT handle_failed_call(%s, %s)", (aid, kind)) == "noop"
    assert one(conn, "SELECT count(*) FROM call_retries") == 1
    assert slots(conn, a) == (0, 10)


def test_backoff_grows_with_attempts_and_retry_after_is_honoured(conn: Conn, setup: Any) -> None:
    p = make_provider(conn)
    qid, aid = placed_call(conn, setup, p)
    conn.execute("UPDATE call_queue SET max_attempts = 5, attempts = 3 WHERE id = %s", (qid,))
    one(conn, "SELECT handle_failed_call(%s, 'busy')", (aid,))
    assert 300 * 4 * 0.8 - 1 <= _retry_delay(conn, qid) <= 300 * 4 * 1.2
    conn.execute("UPDATE call_queue SET scheduled_time = now() WHERE id = %s", (qid,))
    _, aid2 = assigned_call_for(conn, qid, p)
    one(conn, "SELECT handle_failed_call(%s, 'rate_limited', NULL, 100)", (aid2,))
    assert 99 <= _retry_delay(conn, qid) <= 121


def assigned_call_for(conn: Conn, qid: uuid.UUID, p: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID]:
    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (qid, p))
    assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is True
    return qid, aid


def test_provider_error_with_a_single_provider_does_not_strand_the_call(
    conn: Conn, setup: Any
) -> None:
    p = make_provider(conn)
    qid, aid = placed_call(conn, setup, p)
    one(conn, "SELECT handle_failed_call(%s, 'provider_error')", (aid,))
    assert one(conn, "SELECT excluded_provider_ids FROM call_queue WHERE id = %s", (qid,)) == []
    health = conn.execute(
        "SELECT consecutive_failures, status, failed_calls FROM provider_availability"
    ).fetchone()
    assert health == (1, "degraded", 1)


def test_max_attempts_then_failed_with_history(conn: Conn, setup: Any) -> None:
    p = make_provider(conn)
    qid, aid = placed_call(conn, setup, p)
    conn.execute("UPDATE call_queue SET max_attempts = 2 WHERE id = %s", (qid,))
    assert one(conn, "SELECT handle_failed_call(%s, 'no_answer')", (aid,)) == "retry_scheduled"
    conn.execute("UPDATE call_queue SET scheduled_time = now() WHERE id = %s", (qid,))
    _, aid2 = assigned_call_for(conn, qid, p)
    assert one(conn, "SELECT attempt FROM call_assignments WHERE id = %s", (aid2,)) == 2
    assert one(conn, "SELECT handle_failed_call(%s, 'no_answer', 'no one')", (aid2,)) == "failed"
    assert status(conn, qid) == "failed"
    hist = conn.execute(
        "SELECT status, attempts, error, assignment_id FROM call_history"
    ).fetchall()
    assert hist == [("no_answer", 2, "no one", aid2)]
    assert one(conn, "SELECT count(*) FROM call_retries WHERE queue_id = %s", (qid,)) == 2
    assert slots(conn, p) == (0, 10)


def test_permanent_and_canceled_end_at_once(conn: Conn, setup: Any) -> None:
    p = make_provider(conn)
    q1, a1 = placed_call(conn, setup, p)
    q2, a2 = assigned_call(conn, setup, p)
    assert one(conn, "SELECT handle_failed_call(%s, 'permanent', 'invalid number')", (a1,)) == (
        "failed"
    )
    assert one(conn, "SELECT handle_failed_call(%s, 'canceled')", (a2,)) == "canceled"
    assert (status(conn, q1), status(conn, q2)) == ("failed", "canceled")
    hist = dict(conn.execute("SELECT queue_id, status FROM call_history").fetchall())
    assert hist == {q1: "failed", q2: "canceled"}
    assert slots(conn, p) == (0, 10)
    with pytest.raises(psycopg.Error) as err:
        one(conn, "SELECT handle_failed_call(%s, 'weird')", (a1,))
    assert err.value.sqlstate == "CQ013"
    with pytest.raises(psycopg.Error) as err:
        one(conn, "SELECT handle_failed_call(%s, 'busy')", (uuid.uuid4(),))
    assert err.value.sqlstate == "CQ011"


# --- maintenance ------------------------------------------------------------------------------


def test_reap_expired_leases(conn: Conn, setup: Any) -> None:
    p = make_provider(conn)
    claimed = schedule(conn, *setup)
    one(conn, "SELECT queue_id FROM claim_due_calls(1)")
    q_assigned, a_assigned = assigned_call(conn, setup, p)
    q_dialing, a_dialing = assigned_call(conn, setup, p)
    one(conn, "SELECT mark_call_dialing(%s)", (a_dialing,))
    q_placed, a_placed = placed_call(conn, setup, p)
    q_fresh, _ = assigned_call(conn, setup, p)  # lease not expired: untouched
    conn.execute(
        "UPDATE call_queue SET lease_expires_at = now() - interval '1 second' WHERE id = ANY(%s)",
        ([claimed, q_assigned, q_dialing],),
    )
    conn.execute(
        "UPDATE call_assignments SET next_poll_at = now() - interval '16 seconds' WHERE id = %s",
        (a_placed,),
    )
    # a poll that is only a little late is left alone: its chain is probably just busy
    q_late, a_late = placed_call(conn, setup, p)
    conn.execute(
        "UPDATE call_assignments SET next_poll_at = now() - interval '5 seconds' WHERE id = %s",
        (a_late,),
    )
    assert slots(conn, p) == (5, 5)
    rows = set(conn.execute("SELECT queue_id, assignment_id, action FROM reap_expired_leases()"))
    assert rows == {
        (claimed, None, "requeued"),
        (q_assigned, a_assigned, "released"),
        (q_dialing, a_dialing, "reconcile"),
        (q_placed, a_placed, "reconcile"),
    }
    assert status(conn, claimed) == "queued" and status(conn, q_assigned) == "queued"
    assert status(conn, q_fresh) == "assigned"
    assert status(conn, q_late) == "in_progress"
    assert slots(conn, p) == (4, 6)


def test_reconcile_provider_slots(conn: Conn, setup: Any) -> None:
    p = make_provider(conn, max_calls=5)
    assigned_call(conn, setup, p)
    placed_call(conn, setup, p)
    hold_slots(conn, p, 2)  # leaked: held by assignments that do not exist
    assert slots(conn, p) == (4, 1)
    assert one(conn, "SELECT reconcile_provider_slots()") == 2
    assert slots(conn, p) == (2, 3)
    assert slot_violations(conn) == []
    # provider_availability's figures are refreshed by the reconcile (not by each claim)
    row = conn.execute(
        "SELECT current_calls, available_slots FROM provider_availability WHERE provider_id = %s",
        (p,),
    ).fetchone()
    assert row == (2, 3)
    assert one(conn, "SELECT reconcile_provider_slots()") == 0


def test_provider_max_change_moves_free_slots(conn: Conn, setup: Any) -> None:
    p = make_provider(conn, max_calls=5)
    _, a1 = assigned_call(conn, setup, p)
    _, a2 = assigned_call(conn, setup, p)
    _, a3 = assigned_call(conn, setup, p)
    one(conn, "SELECT release_assignment(%s, 'shutdown')", (a1,))  # slot 1 free again
    assert slots(conn, p) == (2, 3)
    # lowered to 2: the call on slot 3 moves into free slot 1; nothing free is left
    conn.execute("UPDATE call_service_providers SET max_concurrent_calls = 2 WHERE id = %s", (p,))
    assert slots(conn, p) == (2, 0)
    assert slot_violations(conn) == []
    # lowered below the calls in flight: the extra call's slot retires when the call ends
    conn.execute("UPDATE call_service_providers SET max_concurrent_calls = 1 WHERE id = %s", (p,))
    assert slots(conn, p) == (2, 0)
    assert one(conn, "SELECT count(*) FROM provider_slots WHERE retired") == 1
    one(conn, "SELECT release_assignment(%s, 'shutdown')", (a2,))
    one(conn, "SELECT release_assignment(%s, 'shutdown')", (a3,))
    assert slots(conn, p) == (0, 1)
    assert one(conn, "SELECT count(*) FROM provider_slots WHERE retired") == 0
    conn.execute("UPDATE call_service_providers SET max_concurrent_calls = 4 WHERE id = %s", (p,))
    assert slots(conn, p) == (0, 4)
    assert slot_violations(conn) == []


def test_record_provider_health_opens_and_closes_the_circuit(conn: Conn) -> None:
    p = make_provider(conn)
    for i in range(4):
        assert one(conn, "SELECT record_provider_health(%s, false, 10, 'down')", (p,)) == "degraded"
        assert one(conn, "SELECT circuit_open_until FROM provider_availability") is None, i
    one(conn, "SELECT record_provider_health(%s, false, 10, 'down')", (p,))
    opened = one(
        conn, "SELECT extract(epoch FROM circuit_open_until - now()) FROM provider_availability"
    )
    assert 29 <= float(opened) <= 30
    assert one(conn, "SELECT get_best_available_provider()") is None
    assert one(conn, "SELECT record_provider_health(%s, true, 5)", (p,)) == "online"
    row = conn.execute(
        "SELECT consecutive_failures, circuit_open_until, latency_ms FROM provider_availability"
    ).fetchone()
    assert row is not None and row[:2] == (0, None) and float(row[2]) == 5.0
    assert one(conn, "SELECT get_best_available_provider()") == p
    assert one(conn, "SELECT record_provider_health(%s, true, 5)", (uuid.uuid4(),)) is None


def test_rollover_usage_periods(conn: Conn) -> None:
    user = make_user(conn, call_limit=50)
    conn.execute(
        "UPDATE user_subscriptions SET current_period_start = now() - interval '75 days',"
        " current_period_end = now() - interval '45 days' WHERE user_id = %s",
        (user,),
    )
    make_user(conn)  # current period: untouched
    assert one(conn, "SELECT rollover_usage_periods()") == 1
    row = conn.execute(
        "SELECT current_period_start <= now(), current_period_end > now(),"
        " current_period_end - current_period_start <= interval '31 days'"
        " FROM user_subscriptions WHERE user_id = %s",
        (user,),
    ).fetchone()
    assert row == (True, True, True)
    usage = conn.execute(
        "SELECT u.calls_made, u.calls_limit, u.calls_remaining,"
        " u.period_start = s.current_period_start"
        " FROM user_call_usage u JOIN user_subscriptions s ON s.id = u.subscription_id"
    ).fetchall()
    assert usage == [(0, 50, 50, True)]
    assert one(conn, "SELECT rollover_usage_periods()") == 0


def test_check_constraints(conn: Conn, setup: Any) -> None:
    user, tpl = setup
    p = make_provider(conn, max_calls=1)
    ins = "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone"
    bad = [
        ("UPDATE provider_availability SET available_slots = -1", "23514"),
        ("UPDATE provider_availability SET current_calls = -1", "23514"),
        ("UPDATE provider_slots SET retired = true WHERE assignment_id IS NULL", "23514"),
        ("UPDATE provider_availability SET status = 'sleepy'", "23514"),
        (
            ins + f", priority) VALUES ('{user}', '{tpl}', 'x', '+15551234567', 11)",
            "23514",
        ),
        (
            ins + f") VALUES ('{user}', '{tpl}', 'x', '555')",
            "23514",
        ),
        (
            ins + f", status) VALUES ('{user}', '{tpl}', 'x', '+15551234567', 'lost')",
            "23514",
        ),
        (
            "INSERT INTO call_assignments (queue_id, provider_id)"
            f" VALUES ('{uuid.uuid4()}', '{p}')",
            "23503",
        ),
    ]
    for statement, code in bad:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(statement)  # type: ignore[arg-type]
        assert err.value.sqlstate == code, statement
    before = one(conn, "SELECT updated_at FROM call_templates WHERE id = %s", (tpl,))
    conn.execute("UPDATE call_templates SET name = 'renamed' WHERE id = %s", (tpl,))
    assert one(conn, "SELECT updated_at FROM call_templates WHERE id = %s", (tpl,)) > before


def test_numeric_arguments_accept_python_floats_ints_and_decimals(conn: Conn, setup: Any) -> None:
    from decimal import Decimal

    p = make_provider(conn)
    _, a1 = placed_call(conn, setup, p)
    _, a2 = placed_call(conn, setup, p)
    _, a3 = placed_call(conn, setup, p)
    assert one(conn, "SELECT complete_call(p_assignment_id => %s, p_duration_seconds => %s,"
               " p_cost => %s)", (a1, 61.5, 0.0125))  # fmt: skip
    assert one(conn, "SELECT complete_call(%s, %s, NULL, NULL, %s)", (a2, Decimal("30"), 1))
    assert one(conn, "SELECT handle_failed_call(p_assignment_id => %s, p_failure_kind => 'busy',"
               " p_duration_seconds => %s)", (a3, 4.2)) == "retry_scheduled"  # fmt: skip
    assert one(conn, "SELECT record_provider_health(%s, %s, %s, %s)", (p, True, 12.5, None)) == (
        "online"
    )
    row = conn.execute(
        "SELECT duration_seconds, cost FROM call_history WHERE assignment_id = %s", (a1,)
    ).fetchone()
    assert row is not None and (float(row[0]), float(row[1])) == (61.5, 0.0125)
    # minutes are billed for every outcome the provider reports a duration for (busy: 4.2 s)
    assert one(conn, "SELECT minutes_used FROM user_call_usage") == 2 + 1 + 1


def test_release_wakes_the_dispatchers(conn: Conn, setup: Any, db_url: str) -> None:
    p = make_provider(conn)
    _, aid = assigned_call(conn, setup, p)
    with connect(db_url) as listener:
        listener.execute("LISTEN callq_queue")
        one(conn, "SELECT release_assignment(%s, 'shutdown')", (aid,))
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.payload for n in got] == [""]


def test_claims_with_nothing_to_do(conn: Conn, setup: Any) -> None:
    schedule(conn, *setup)
    assert conn.execute("SELECT * FROM claim_due_calls(0)").fetchall() == []
    make_provider(conn)
    assert conn.execute("SELECT * FROM claim_and_assign_calls(0)").fetchall() == []
    assert one(conn, "SELECT count(*) FROM call_queue WHERE status = 'queued'") == 1


def test_retry_delay_scale_shortens_backoff(conn: Conn, setup: Any) -> None:
    p = make_provider(conn)
    q, a = assigned_call(conn, setup, p)
    one(conn, "SELECT mark_call_dialing(%s)", (a,))
    conn.execute("SELECT set_config('callq.retry_delay_scale', '0.01', false)")
    assert one(conn, "SELECT handle_failed_call(%s, 'busy')", (a,)) == "retry_scheduled"
    wait = one(
        conn,
        "SELECT extract(epoch FROM scheduled_time - now()) FROM call_queue WHERE id = %s",
        (q,),
    )
    assert 0 < float(wait) <= 300 * 1.2 * 0.01 + 0.5  # 300 s base, jitter up to 1.2


def test_dialing_lease_follows_the_claim_lease(conn: Conn, setup: Any) -> None:
    make_provider(conn)
    schedule(conn, *setup)
    row = conn.execute(
        "SELECT queue_id, assignment_id FROM claim_and_assign_calls(1, 'w', 7)"
    ).fetchone()
    assert row is not None and row[1] is not None
    one(conn, "SELECT mark_call_dialing(%s)", (row[1],))
    lease = one(
        conn,
        "SELECT extract(epoch FROM lease_expires_at - now()) FROM call_queue WHERE id = %s",
        (row[0],),
    )
    assert 5 < float(lease) <= 7


def test_timing_the_worker_and_sql_share(conn: Conn) -> None:
    """The lease and the poll deadline live in SQL; the worker's defaults agree with them."""
    from worker.settings import Settings

    s = Settings(_env_file=None)
    assert s.lease_seconds == one(conn, "SELECT default_lease_seconds()")
    assert s.track_initial_delay_seconds < one(conn, "SELECT poll_deadline_seconds()")


def test_failure_kinds_are_one_set_in_python_and_sql(conn: Conn) -> None:
    import re

    from dispatch.policy import FAILURE_KINDS

    assert set(one(conn, "SELECT failure_kinds()")) == FAILURE_KINDS
    check = one(
        conn,
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'call_retries'::regclass AND pg_get_constraintdef(oid) LIKE '%reason%'",
    )
    assert set(re.findall(r"'(\w+)'", check)) == FAILURE_KINDS


# --- one home for the live-state lists ----------------------------------------------------------

LIST_FUNCTIONS = ("live_call_statuses", "in_flight_call_statuses", "live_assignment_states")
# partial indexes must spell their list out (a predicate cannot call a function)
INDEX_LISTS = {
    "call_queue_lease_idx": "in_flight_call_statuses",
    "call_queue_user_live_idx": "live_call_statuses",
    "call_assignments_one_live_idx": "live_assignment_states",
    "call_assignments_provider_live_idx": "live_assignment_states",
}


def test_live_state_lists_have_one_home(conn: Conn) -> None:
    """Each list of live states is a function; the partial indexes that must write theirs out
    give the same list, and no migration writes a list anywhere else."""
    lists = {name: one(conn, f"SELECT {name}()") for name in LIST_FUNCTIONS}
    for index, function in INDEX_LISTS.items():
        predicate = one(
            conn,
            "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = %s::regclass",
            (index,),
        )
        assert re.findall(r"'([a-z_]+)'::text", predicate) == lists[function], index
    migrations = Path(__file__).parents[2] / "supabase" / "migrations"
    for path in sorted(migrations.glob("*.sql")):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            for states in lists.values():
                if ", ".join(f"'{s}'" for s in states) + ")" not in line:
                    continue
                # allowed: an index predicate (the line after its CREATE INDEX)
                assert n > 0 and "CREATE" in lines[n - 1] and "INDEX" in lines[n - 1], (
                    f"{path.name}:{n + 1} writes a live-state list; use its function"
                )


def test_eligibility_has_one_home(conn: Conn) -> None:
    """Whether a provider may take calls now is written once, in the view eligible_providers."""
    p = make_provider(conn)
    eligible = "SELECT count(*) FROM eligible_providers WHERE provider_id = %s"
    assert one(conn, eligible, (p,)) == 1
    for change in (
        "UPDATE provider_availability SET status = 'offline' WHERE provider_id = %s",
        "UPDATE provider_availability SET circuit_open_until = now() + interval '1 minute'"
        " WHERE provider_id = %s",
        "UPDATE call_service_providers SET is_active = false WHERE id = %s",
    ):
        with conn.transaction(force_rollback=True):
            conn.execute(change, (p,))  # type: ignore[arg-type]
            assert one(conn, eligible, (p,)) == 0, change
            assert one(conn, "SELECT get_best_available_provider()") is None, change
    migrations = Path(__file__).parents[2] / "supabase" / "migrations"
    text = "\n".join(p.read_text() for p in sorted(migrations.glob("*.sql")))
    assert text.count("circuit_open_until <= now()") == 1
