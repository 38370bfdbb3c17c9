"""Plans as a contract: dials counted, minutes reserved and settled, plan concurrency and fair
order at claim time, subscription lifecycle, default plan on signup, counters vs recount."""

from __future__ import annotations

import itertools
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from models import queries

from .dbutil import Conn, connect, make_provider, make_template, make_user, one, schedule
from .dbutil import set_clock as pin_clock


def tenant(conn: Conn, **plan: Any) -> tuple[uuid.UUID, uuid.UUID]:
    user = make_user(conn, **plan)
    return user, make_template(conn, user)


def claim(conn: Conn, n: int = 50) -> list[tuple[uuid.UUID, uuid.UUID]]:
    rows = conn.execute("SELECT queue_id, assignment_id FROM claim_and_assign_calls(%s)", (n,))
    return [(r[0], r[1]) for r in rows.fetchall()]


def usage(conn: Conn, user: uuid.UUID) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT calls_made, minutes_used, minutes_reserved FROM user_call_usage WHERE user_id = %s",
        (user,),
    ).fetchone()
    return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))


def gate(conn: Conn, aid: uuid.UUID) -> tuple[bool, int | None]:
    row = conn.execute("SELECT won, max_duration_seconds FROM dial_gate(%s)", (aid,)).fetchone()
    assert row is not None
    return bool(row[0]), row[1]


def test_voicemail_on_a_two_call_plan_places_two_dials(conn: Conn) -> None:
    """The issue's case: plan of 2 calls, numbers that reach voicemail: 2 dials, not 18."""
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=2, minute_limit=None)
    ids = [schedule(conn, user, tpl) for _ in range(2)]
    with pytest.raises(psycopg.Error) as err:
        schedule(conn, user, tpl)
    assert err.value.sqlstate == "CQ003"
    dials = 0
    for _ in range(10):
        conn.execute("UPDATE call_queue SET scheduled_time = now() WHERE status = 'queued'")
        for _, aid in claim(conn):
            won, _ = gate(conn, aid)
            if won:
                dials += 1
                conn.execute("SELECT handle_failed_call(%s, 'voicemail', NULL, NULL, 60)", (aid,))
    assert dials == 2
    assert usage(conn, user) == (2, 2, 0)
    finals = conn.execute("SELECT status FROM call_queue WHERE id = ANY(%s)", (ids,)).fetchall()
    assert {r[0] for r in finals} == {"failed"}
    assert one(conn, "SELECT count(*) FROM call_history WHERE user_id = %s", (user,)) == 2


def test_retries_use_only_dials_no_accepted_call_needs(conn: Conn) -> None:
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=3, minute_limit=None)
    first = schedule(conn, user, tpl)
    ((_, aid),) = claim(conn)
    assert gate(conn, aid)[0]
    # two more accepted while the first is in flight: 1 dial used + 2 waiting = 3
    schedule(conn, user, tpl)
    schedule(conn, user, tpl)
    # the busy first call may not retry: its retry would take a dial the others need
    assert one(conn, "SELECT handle_failed_call(%s, 'busy')", (aid,)) == "failed"
    assert "call_limit_reached" in one(
        conn, "SELECT last_error FROM call_queue WHERE id = %s", (first,)
    )


def test_gate_refuses_a_dial_beyond_the_plan(conn: Conn) -> None:
    """A downgraded plan: the gate is the backstop; the call fails undialed with a reason."""
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=5, minute_limit=None)
    qid = schedule(conn, user, tpl)
    ((_, aid),) = claim(conn)
    conn.execute(
        "UPDATE subscription_plans SET call_limit = 0 WHERE id ="
        " (SELECT plan_id FROM user_subscriptions WHERE user_id = %s)",
        (user,),
    )
    assert gate(conn, aid) == (False, None)
    row = conn.execute("SELECT status, last_error FROM call_queue WHERE id = %s", (qid,)).fetchone()
    assert row == ("failed", "call_limit_reached")
    assert one(conn, "SELECT state FROM call_assignments WHERE id = %s", (aid,)) == "released"
    assert one(conn, "SELECT sum(current_calls) FROM provider_load") == 0
    assert usage(conn, user)[0] == 0


def test_minutes_reserved_at_the_gate_become_the_max_duration(conn: Conn) -> None:
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=None, minute_limit=10, max_concurrent=2)
    for _ in range(3):
        schedule(conn, user, tpl)
    got = claim(conn)
    assert len(got) == 2  # plan concurrency 2
    won1, cap1 = gate(conn, got[0][1])
    won2, cap2 = gate(conn, got[1][1])
    # 10 minutes over 2 concurrent calls: 5 each, minus the 5 s hang-up margin
    assert (won1, cap1, won2, cap2) == (True, 5 * 60 - 5, True, 5 * 60 - 5)
    assert usage(conn, user) == (2, 0, 10)
    # all minutes reserved: scheduling more is refused (its own SQLSTATE)
    with pytest.raises(psycopg.Error) as err:
        schedule(conn, user, tpl)
    assert err.value.sqlstate == "CQ030"
    # the first call ends after 61 s: 2 minutes billed, its 5 reserved given back
    one(conn, "SELECT complete_call(%s, 61)", (got[0][1],))
    assert usage(conn, user) == (2, 2, 5)
    ((_, a3),) = claim(conn)
    assert gate(conn, a3) == (True, 3 * 60 - 5)  # what is left: 10 - 2 - 5
    one(conn, "SELECT complete_call(%s, 295)", (got[1][1],))
    one(conn, "SELECT complete_call(%s, 170)", (a3,))
    assert usage(conn, user) == (3, 2 + 5 + 3, 0)  # exactly the plan, never above


def live_usage(conn: Conn, user: uuid.UUID) -> tuple[int, int, int]:
    """The exact figures: user_call_usage plus the endings not folded into it yet."""
    row = conn.execute(
        "SELECT calls_made, minutes_used, minutes_reserved FROM user_call_usage_live"
        " WHERE user_id = %s",
        (user,),
    ).fetchone()
    return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))


def two_gated_calls(
    conn: Conn,
) -> tuple[uuid.UUID, uuid.UUID, list[tuple[uuid.UUID, uuid.UUID]]]:
    """A tenant with 10 minutes a period and two calls past their gates (5 minutes each)."""
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=None, minute_limit=10, max_concurrent=2)
    for _ in range(2):
        schedule(conn, user, tpl)
    got = claim(conn)
    assert [gate(conn, aid)[0] for _, aid in got] == [True, True]
    return user, tpl, got


def test_endings_bill_off_the_period_row_and_every_reader_adds_them(
    conn: Conn, db_url: str
) -> None:
    """While another transaction holds the period's usage row (a gate of the tenant, through
    its commit), an ending neither waits for it nor loses its minutes: they wait as a pending
    row that the view, schedule_call and the retry check add, until the next gate or beat's
    reconcile folds them into the row."""
    user, tpl, got = two_gated_calls(conn)
    assert usage(conn, user) == (2, 0, 10)
    with connect(db_url) as holder:
        holder.execute("BEGIN")
        holder.execute(
            "SELECT 1 FROM user_call_usage WHERE user_id = %s FOR NO KEY UPDATE", (user,)
        )
        conn.execute("SET statement_timeout = '10s'")  # a wait for the row fails, not hangs
        one(conn, "SELECT complete_call(%s, 61)", (got[0][1],))
        assert one(conn, "SELECT count(*) FROM user_call_usage_deltas") == 1
        assert usage(conn, user) == (2, 0, 10)  # the row trails ...
        assert live_usage(conn, user) == (2, 2, 5)  # ... the exact figures do not
        # the row alone says all 10 minutes are spoken for; with the ending, 7 are
        schedule(conn, user, tpl)
        holder.execute("COMMIT")
    conn.execute("RESET statement_timeout")
    # the tenant's next gate locks the row and folds the ending in before its checks
    ((_, a3),) = claim(conn)
    assert gate(conn, a3) == (True, 3 * 60 - 5)  # what is left: 10 - 2 - 5
    assert one(conn, "SELECT count(*) FROM user_call_usage_deltas") == 0
    assert usage(conn, user) == live_usage(conn, user) == (3, 2, 8)
    # an ending with the row free folds itself; one while it is held waits for beat's reconcile
    one(conn, "SELECT complete_call(%s, 295)", (got[1][1],))
    assert usage(conn, user) == (3, 7, 3)
    with connect(db_url) as holder:
        holder.execute("BEGIN")
        holder.execute(
            "SELECT 1 FROM user_call_usage WHERE user_id = %s FOR NO KEY UPDATE", (user,)
        )
        assert one(conn, "SELECT handle_failed_call(%s, 'voicemail', NULL, NULL, 100)", (a3,))
        assert usage(conn, user) == (3, 7, 3)
        holder.execute("COMMIT")
    assert live_usage(conn, user) == (3, 9, 0)
    assert one(conn, "SELECT reconcile_tenant_counters()") == 0  # folded, nothing to correct
    assert one(conn, "SELECT count(*) FROM user_call_usage_deltas") == 0
    assert usage(conn, user) == (3, 9, 0)  # exactly what the provider reported, rounded up


def test_an_endings_fold_gives_up_where_taking_the_row_would_wait(conn: Conn, db_url: str) -> None:
    """An ending folds its usage last, holding its tenant's counter stripe, and a gate holding
    the period's row waits for that stripe: the fold must never wait. SKIP LOCKED does not
    ensure it (PostgreSQL waits for the newest version's locker when the row was updated since
    the statement's snapshot, bench/FINDINGS.md 16; no test can time that), so the try is
    bounded. A table lock that takes every row lock's turn stands in for such a wait: the fold
    gives up at once, the ending's minutes stay pending, and the caller's lock_timeout is
    what it was, whether the row was taken or not."""
    user, _, got = two_gated_calls(conn)
    period = one(conn, "SELECT id FROM user_call_usage WHERE user_id = %s", (user,))
    with connect(db_url) as holder:
        holder.execute("BEGIN")
        holder.execute(
            "SELECT 1 FROM user_call_usage WHERE user_id = %s FOR NO KEY UPDATE", (user,)
        )
        one(conn, "SELECT complete_call(%s, 61)", (got[0][1],))  # pending: the row is held
        # the row free, the table not: reads go on, a row lock would wait
        holder.execute("COMMIT")
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE user_call_usage IN EXCLUSIVE MODE")
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '10s'")  # a wait fails, not hangs
            conn.execute("SET LOCAL lock_timeout = '7s'")
            assert one(conn, "SELECT fold_call_usage(%s, true)", (period,)) is False
            assert one(conn, "SHOW lock_timeout") == "7s"
        holder.execute("COMMIT")
    assert one(conn, "SELECT count(*) FROM user_call_usage_deltas") == 1
    assert usage(conn, user) == (2, 0, 10)
    with conn.transaction():
        conn.execute("SET LOCAL lock_timeout = '7s'")
        assert one(conn, "SELECT fold_call_usage(%s, true)", (period,)) is True
        assert one(conn, "SHOW lock_timeout") == "7s"
    assert one(conn, "SELECT count(*) FROM user_call_usage_deltas") == 0
    assert usage(conn, user) == live_usage(conn, user) == (2, 2, 5)


def test_a_plan_without_limits_counts_dials_without_waiting_for_the_period_row(
    conn: Conn, db_url: str
) -> None:
    """A plan without call or minute limits has nothing to check its dials against: a gate
    chunk counts them as a pending row of the period instead of locking the period's row, so
    its chunks never queue on it; every dial is still counted once, and one given back
    (released, never sent) is subtracted exactly."""
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=None, minute_limit=None, max_concurrent=10)
    schedule(conn, user, tpl)
    ((_, first),) = claim(conn)
    assert gate(conn, first) == (True, None)  # the period's first dial creates its row
    assert usage(conn, user) == live_usage(conn, user) == (1, 0, 0)
    for _ in range(3):
        schedule(conn, user, tpl)
    chunk = sorted(str(aid) for _, aid in claim(conn))
    with connect(db_url) as holder:
        holder.execute("BEGIN")
        holder.execute(
            "SELECT 1 FROM user_call_usage WHERE user_id = %s FOR NO KEY UPDATE", (user,)
        )
        conn.execute("SET statement_timeout = '10s'")  # a wait for the row fails, not hangs
        won = conn.execute(
            "SELECT count(*) FROM dial_gates(%s::uuid[]) WHERE won", (chunk,)
        ).fetchone()
        assert won == (3,)
        assert usage(conn, user) == (1, 0, 0)  # the row trails ...
        assert live_usage(conn, user) == (4, 0, 0)  # ... the exact figures do not
        holder.execute("COMMIT")
    conn.execute("RESET statement_timeout")
    # a dial given back while still pending: exactly one less
    assert one(conn, "SELECT release_assignment(%s, 'connect_error')", (chunk[0],)) is True
    assert usage(conn, user) == live_usage(conn, user) == (3, 0, 0)
    one(conn, "SELECT complete_call(%s, 61)", (chunk[1],))  # folds itself: the row is free
    assert usage(conn, user) == (3, 2, 0)
    assert one(conn, "SELECT reconcile_tenant_counters()") == 0
    assert one(conn, "SELECT count(*) FROM user_call_usage_deltas") == 0


def test_pending_endings_count_against_the_limits(conn: Conn, db_url: str) -> None:
    """A pending ending's minutes count for schedule_call (CQ030), for the retry check, and for
    the gate's share, as if they were on the row."""
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=None, minute_limit=4, max_concurrent=1)
    first = schedule(conn, user, tpl)
    ((_, a1),) = claim(conn)
    assert gate(conn, a1) == (True, 4 * 60 - 5)
    with connect(db_url) as holder:
        holder.execute("BEGIN")
        holder.execute(
            "SELECT 1 FROM user_call_usage WHERE user_id = %s FOR NO KEY UPDATE", (user,)
        )
        # 4 minutes spoken: the retry would need a minute the plan no longer has
        assert one(conn, "SELECT handle_failed_call(%s, 'busy', NULL, NULL, 200)", (a1,)) == (
            "failed"
        )
        assert "minute_limit_reached" in one(
            conn, "SELECT last_error FROM call_queue WHERE id = %s", (first,)
        )
        assert usage(conn, user) == (1, 0, 4)  # still on the pending row only
        with pytest.raises(psycopg.Error) as err:
            schedule(conn, user, tpl)
        assert err.value.sqlstate == "CQ030"
        holder.execute("COMMIT")
    assert live_usage(conn, user) == (1, 4, 0)


def test_no_minute_left_holds_or_fails_the_call(conn: Conn) -> None:
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=None, minute_limit=1, max_concurrent=5)
    a = schedule(conn, user, tpl)
    b = schedule(conn, user, tpl)
    got = dict(claim(conn))
    assert gate(conn, got[a]) == (True, 55)
    # b: the only minute is reserved by a call in flight: held, due again in 30 s
    assert gate(conn, got[b]) == (False, None)
    row = conn.execute(
        "SELECT status, scheduled_time > now() + interval '20 seconds', attempts"
        " FROM call_queue WHERE id = %s",
        (b,),
    ).fetchone()
    assert row == ("queued", True, 0)
    one(conn, "SELECT complete_call(%s, 50)", (got[a],))
    conn.execute("UPDATE call_queue SET scheduled_time = now() WHERE id = %s", (b,))
    ((_, ab),) = claim(conn)
    # now used up with nothing in flight: b fails undialed
    assert gate(conn, ab) == (False, None)
    row = conn.execute("SELECT status, last_error FROM call_queue WHERE id = %s", (b,)).fetchone()
    assert row == ("failed", "minute_limit_reached")
    assert usage(conn, user) == (1, 1, 0)


def test_release_gives_the_dial_and_the_minutes_back(conn: Conn) -> None:
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=1, minute_limit=3)
    schedule(conn, user, tpl)
    ((_, aid),) = claim(conn)
    assert gate(conn, aid)[0]
    assert usage(conn, user) == (1, 0, 3)
    assert one(conn, "SELECT release_assignment(%s, 'connect_error')", (aid,)) is True
    assert usage(conn, user) == (0, 0, 0)
    ((_, aid2),) = claim(conn)
    assert gate(conn, aid2)[0]


def test_plan_concurrency_holds_calls_queued_until_a_slot_frees(conn: Conn) -> None:
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=None, minute_limit=None, max_concurrent=1)
    ids = [schedule(conn, user, tpl) for _ in range(4)]
    first = claim(conn)
    assert len(first) == 1
    assert claim(conn) == []
    assert conn.execute("SELECT * FROM get_next_call_in_queue()").fetchall() == []
    statuses = conn.execute(
        "SELECT status, count(*) FROM call_queue WHERE id = ANY(%s) GROUP BY 1", (ids,)
    ).fetchall()
    assert dict(statuses) == {"assigned": 1, "queued": 3}  # not failed, not retried
    assert one(conn, "SELECT count(*) FROM call_retries") == 0
    one(conn, "SELECT mark_call_dialing(%s)", (first[0][1],))
    one(conn, "SELECT complete_call(%s, 10)", (first[0][1],))
    assert len(claim(conn)) == 1


def test_paced_campaign_calls_respect_plan_concurrency_and_status(conn: Conn) -> None:
    """A paced campaign's calls come through its lane: the plan's cap and the subscription
    status hold there too, on both claims, and the lane's tokens go only to calls kept."""
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=None, minute_limit=None, max_concurrent=2)
    plain = schedule(conn, user, tpl)
    camp = one(conn, "SELECT create_campaign(%s, %s, 'C', 'running')", (user, tpl))
    conn.execute("SELECT set_campaign_pacing(%s, 600, 50)", (camp,))
    rows = [{"name": "N", "phone": f"+1555000{i:04d}"} for i in range(5)]
    conn.execute("SELECT count(*) FROM schedule_calls(%s, %s)", (camp, json.dumps(rows)))
    got = claim(conn)
    assert len(got) == 2 and plain in {q for q, _ in got}
    assert claim(conn) == []
    assert conn.execute("SELECT * FROM claim_due_calls(10)").fetchall() == []
    # 10 tokens a second at most; one spent (one lane call kept), not five
    tokens = one(conn, "SELECT pace_tokens FROM call_campaigns WHERE id = %s", (camp,))
    assert 9 <= tokens < 10
    for _, aid in got:
        one(conn, "SELECT release_assignment(%s, 'connect_error')", (aid,))
    conn.execute("UPDATE user_subscriptions SET status = 'past_due' WHERE user_id = %s", (user,))
    assert claim(conn) == []
    assert conn.execute("SELECT * FROM claim_due_calls(10)").fetchall() == []
    conn.execute("UPDATE user_subscriptions SET status = 'active' WHERE user_id = %s", (user,))
    conn.execute("UPDATE call_queue SET scheduled_time = now() WHERE user_id = %s", (user,))
    assert len(conn.execute("SELECT * FROM claim_due_calls(10)").fetchall()) == 2


def test_plan_calls_per_minute_keeps_calls_queued_until_the_rate_allows(conn: Conn) -> None:
    """subscription_plans.calls_per_minute: claims over the rate leave calls queued (not
    failed); they go when the rate allows, on either claim; one second's worth is the burst."""
    make_provider(conn, max_calls=100)
    user, tpl = tenant(conn, call_limit=None, minute_limit=None, max_concurrent=100)
    other, other_tpl = tenant(conn, call_limit=None, minute_limit=None, max_concurrent=100)
    conn.execute(
        "UPDATE subscription_plans SET calls_per_minute = 2 WHERE id ="
        " (SELECT plan_id FROM user_subscriptions WHERE user_id = %s)",
        (user,),
    )
    t0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
    pin_clock(conn, t0)
    try:
        ids = [schedule(conn, user, tpl) for _ in range(4)]
        others = [schedule(conn, other, other_tpl) for _ in range(3)]
        got = {q for q, _ in claim(conn)}
        assert len(got & set(ids)) == 1 and set(others) <= got  # the other tenant is not held
        assert claim(conn) == []
        pin_clock(conn, t0 + timedelta(seconds=29))
        assert claim(conn) == []
        assert conn.execute("SELECT * FROM claim_due_calls(10)").fetchall() == []
        pin_clock(conn, t0 + timedelta(seconds=30))
        assert len(conn.execute("SELECT * FROM claim_due_calls(10)").fetchall()) == 1
        statuses = conn.execute(
            "SELECT status, count(*) FROM call_queue WHERE id = ANY(%s) GROUP BY 1", (ids,)
        ).fetchall()
        assert dict(statuses) == {"assigned": 1, "claimed": 1, "queued": 2}
        # a long pause does not bank more than the burst
        pin_clock(conn, t0 + timedelta(hours=1))
        assert len(claim(conn)) == 1
        # 600 a minute: ten a second at once, then one every 0.1 s
        conn.execute(
            "UPDATE subscription_plans SET calls_per_minute = 600 WHERE id ="
            " (SELECT plan_id FROM user_subscriptions WHERE user_id = %s)",
            (user,),
        )
        more = [schedule(conn, user, tpl) for _ in range(15)]
        pin_clock(conn, t0 + timedelta(hours=2))
        assert len(claim(conn)) == 10
        pin_clock(conn, t0 + timedelta(hours=2, seconds=0.35))
        assert len(claim(conn)) == 3
        assert (
            one(
                conn,
                "SELECT count(*) FROM call_queue WHERE id = ANY(%s) AND status = 'queued'",
                (more + ids,),
            )
            == 3
        )
    finally:
        pin_clock(conn, None)


def test_claims_rotate_between_tenants_within_a_priority(conn: Conn) -> None:
    make_provider(conn, max_calls=500)
    a_user, a_tpl = tenant(conn, call_limit=None, minute_limit=None, max_concurrent=1000)
    b_user, b_tpl = tenant(conn, call_limit=None, minute_limit=None, max_concurrent=1000)
    old = datetime.now(UTC) - timedelta(minutes=5)
    conn.execute(
        "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone,"
        " scheduled_time) SELECT %s, %s, 'A', '+15551234567', %s + g * interval '1 ms'"
        " FROM generate_series(1, 300) g",
        (a_user, a_tpl, old),
    )
    b_ids = [schedule(conn, b_user, b_tpl) for _ in range(3)]
    urgent = schedule(conn, b_user, b_tpl, priority=1)
    got = [q for q, _ in claim(conn, 8)]
    assert got[0] == urgent  # priority still first
    assert set(b_ids) <= set(got)  # B's calls do not wait behind A's 300
    owners = [one(conn, "SELECT user_id FROM call_queue WHERE id = %s", (q,)) for q in got[1:7]]
    assert owners == [a_user, b_user] * 3  # round robin within priority 5


def test_fair_order_takes_each_tenants_first_calls_down_the_priorities(conn: Conn) -> None:
    """claimable_calls' candidates equal the fair order's definition: each tenant's first
    min(room, batch + max(batch, 8)) due calls by (priority, time), then by (priority, turn
    within the level, time) across tenants; here with levels too short to fill a tenant's room,
    so the walk down the priorities goes on, and a tenant whose cap is its room."""
    rng = random.Random(12)
    now = datetime.now(UTC)
    tick = itertools.count()
    due: dict[uuid.UUID, tuple[int, list[tuple[int, datetime, uuid.UUID]]]] = {}
    for cap in (1000, 3, 1000):
        user, tpl = tenant(conn, call_limit=None, minute_limit=None, max_concurrent=cap)
        due[user] = (cap, [])
        for _ in range(rng.randint(5, 30)):
            prio = rng.choice([1, 2, 2, 3, 5, 5, 5, 9, 10])
            later = rng.random() < 0.2  # not due yet: never a candidate
            at = now + timedelta(
                hours=1 if later else -1, seconds=rng.randint(1, 3000), milliseconds=next(tick)
            )
            qid = one(
                conn,
                "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone,"
                " priority, scheduled_time) VALUES (%s, %s, 'A', '+15551234567', %s, %s)"
                " RETURNING id",
                (user, tpl, prio, at),
            )
            if not later:
                due[user][1].append((prio, at, qid))
    for batch in (1, 3, 7, 20, 60):
        span = batch + max(batch, 8)
        ranked = []
        for cap, calls in due.values():
            mine = sorted(calls)[: min(cap, span)]
            for prio, group in itertools.groupby(mine, key=lambda c: c[0]):
                ranked += [(prio, k, at, qid) for k, (_, at, qid) in enumerate(group, 1)]
        want = [qid for *_, qid in sorted(ranked)][:batch]
        got = one(conn, "SELECT ids FROM claimable_calls(%s)", (batch,))
        assert got == want, batch


def test_past_due_or_canceled_subscription_holds_calls(conn: Conn) -> None:
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=None, minute_limit=None)
    qid = schedule(conn, user, tpl)
    conn.execute("UPDATE user_subscriptions SET status = 'past_due' WHERE user_id = %s", (user,))
    assert claim(conn) == []
    with pytest.raises(psycopg.Error) as err:
        schedule(conn, user, tpl)
    assert err.value.sqlstate == "CQ002"
    assert one(conn, "SELECT status FROM call_queue WHERE id = %s", (qid,)) == "queued"
    conn.execute("UPDATE user_subscriptions SET status = 'active' WHERE user_id = %s", (user,))
    assert [q for q, _ in claim(conn)] == [qid]


def test_cancel_at_period_end_ends_instead_of_renewing(conn: Conn) -> None:
    keep, _ = tenant(conn)
    leave, _ = tenant(conn)
    conn.execute(
        "UPDATE user_subscriptions SET current_period_start = now() - interval '2 months',"
        " current_period_end = now() - interval '1 day',"
        " cancel_at_period_end = (user_id = %s)",
        (leave,),
    )
    assert one(conn, "SELECT rollover_usage_periods()") == 2
    rows = dict(
        conn.execute(
            "SELECT user_id, status FROM user_subscriptions WHERE user_id IN (%s, %s)",
            (keep, leave),
        ).fetchall()
    )
    assert rows == {keep: "active", leave: "canceled"}
    assert one(conn, "SELECT canceled_at IS NOT NULL FROM user_subscriptions WHERE user_id = %s",
               (leave,))  # fmt: skip


def test_signup_gets_the_default_plan_and_the_example_runs_verbatim(conn: Conn) -> None:
    conn.execute(
        "INSERT INTO subscription_plans (name, price, call_limit, minute_limit,"
        " max_concurrent_calls, is_default) VALUES ('Free', 0, 10, 30, 1, true)"
    )
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO subscription_plans (name, is_default) VALUES ('Other', true)")
    uid = uuid.uuid4()
    conn.execute(
        "INSERT INTO auth.users (id, email, raw_user_meta_data) VALUES (%s, 'new@example.com', %s)",
        (uid, json.dumps({"full_name": "New User"})),
    )
    tpl = make_template(conn, uid)
    # The description's "Schedule a call" example, verbatim but for the two ids.
    qid = one(
        conn,
        f"""SELECT schedule_call(
  '{uid}',
  '{tpl}',
  'John Doe',
  '+15551234567',
  'john@example.com',
  CURRENT_TIMESTAMP + INTERVAL '1 hour',
  3, -- priority
  '{{"company_name": "Acme Inc"}}', -- custom variables
  '{{"source": "web_app"}}' -- metadata
);""",
    )
    assert one(conn, "SELECT status FROM call_queue WHERE id = %s", (qid,)) == "queued"
    plan = one(
        conn,
        "SELECT p.name FROM user_subscriptions s JOIN subscription_plans p ON p.id = s.plan_id"
        " WHERE s.user_id = %s AND s.status = 'active'",
        (uid,),
    )
    assert plan == "Free"


def test_counters_follow_every_path_and_reconcile_fixes_drift(conn: Conn) -> None:
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=None, minute_limit=None)
    for _ in range(5):
        schedule(conn, user, tpl)
    got = claim(conn, 3)
    one(conn, "SELECT mark_call_dialing(%s)", (got[0][1],))
    one(conn, "SELECT release_assignment(%s, 'shutdown')", (got[1][1],))
    conn.execute(
        "UPDATE call_queue SET status = 'canceled' WHERE id IN"
        " (SELECT id FROM call_queue WHERE status = 'queued' LIMIT 1)"
    )
    assert _counts(conn, user) == (2, 1, 1)
    assert one(conn, "SELECT reconcile_tenant_counters()") == 0
    conn.execute("UPDATE tenant_call_counters SET queued = 99, dialed = 7")
    # every stripe row of the tenant was wrong
    assert one(conn, "SELECT reconcile_tenant_counters()") == one(conn, "SELECT counter_stripes()")
    assert _counts(conn, user) == (2, 1, 1)
    # in flight: exact per stripe (a claim's stripe); waiting: exact as the tenant's sum
    assert one(conn, "SELECT reconcile_tenant_counters()") == 0


def _counts(conn: Conn, user: Any) -> tuple[int, int, int]:
    """The tenant's counters: the sums over its stripes."""
    row = conn.execute(
        "SELECT sum(queued)::int, sum(claimed)::int, sum(dialed)::int FROM tenant_call_counters"
        " WHERE user_id = %s",
        (user,),
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def test_counters_are_readable_only_by_their_tenant(conn: Conn) -> None:
    from .dbutil import as_role

    me, tpl = tenant(conn)
    other, other_tpl = tenant(conn)
    schedule(conn, me, tpl)
    schedule(conn, other, other_tpl)
    with as_role(conn, "authenticated", me):
        rows = conn.execute(
            "SELECT user_id, sum(queued)::int FROM tenant_call_counters GROUP BY user_id"
        ).fetchall()
        assert rows == [(me, 1)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE tenant_call_counters SET queued = 0")
    with as_role(conn, "anon"), pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM tenant_call_counters")


def test_create_pacing_is_shared_and_bounded(conn: Conn) -> None:
    from providers.synthflow import DEFAULT_CREATES_PER_SECOND

    p = make_provider(conn)
    conn.execute(
        "UPDATE call_service_providers SET provider_type = 'synthflow' WHERE id = %s", (p,)
    )
    # the documented default lives in SQL and in the adapter: they agree
    assert one(conn, "SELECT provider_creates_per_second(%s)", (p,)) == DEFAULT_CREATES_PER_SECOND
    conn.execute(
        "UPDATE call_service_providers SET config = '{\"creates_per_second\": 4}' WHERE id = %s",
        (p,),
    )
    waits = [one(conn, "SELECT reserve_provider_create(%s, 0.55)", (p,)) for _ in range(4)]
    assert waits[0] == pytest.approx(0, abs=0.1)
    for a, b in itertools.pairwise(waits[:3]):
        assert b - a == pytest.approx(0.25, abs=0.1)  # one slot per 1/rate, fleet-wide
    assert waits[3] is None  # past the bound: nothing taken, the caller defers the call
    vapi = make_provider(conn)
    assert one(conn, "SELECT reserve_provider_create(%s, 0)", (vapi,)) == 0  # no published rate


def claim_and_gate(conn: Conn, n: int = 50, gate_at_most: int = 5) -> list[tuple[str, str]]:
    """claim_and_gate_calls: (assignment state, queue status) of each call claimed."""
    rows = conn.execute(
        "SELECT state, queue_status FROM claim_and_gate_calls(%s, 'w', 60, %s)", (n, gate_at_most)
    )
    return [(r[0], r[1]) for r in rows.fetchall()]


def test_a_small_claim_passes_its_gates_in_the_same_transaction(conn: Conn) -> None:
    """A claim of at most p_gate calls of one tenant is gated by claim_and_gate_calls itself,
    as dial_gates would (the dial counted, the contact attempt recorded, the minutes reserved
    as the max duration); a larger claim is left for the chunk's gates."""
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=10, minute_limit=100)
    schedule(conn, user, tpl)
    gate(conn, claim(conn)[0][1])  # the period's usage row exists from the first dial on
    schedule(conn, user, tpl)
    assert claim_and_gate(conn) == [("dialing", "dialing")]
    assert usage(conn, user)[0] == 2
    assert one(conn, "SELECT count(*) FROM contact_attempts WHERE user_id = %s", (user,)) == 2
    row = conn.execute(
        "SELECT max_duration_seconds, caller_id, paced FROM claim_and_gate_calls(1, 'w', 60, 5)"
    ).fetchall()
    assert row == []  # nothing left to claim
    for _ in range(3):
        schedule(conn, user, tpl)
    assert claim_and_gate(conn, gate_at_most=2) == [("assigned", "assigned")] * 3
    assert usage(conn, user)[0] == 2  # not gated: no dial counted yet


def test_claim_and_gate_never_waits_for_the_usage_row_nor_gates_two_tenants(
    conn: Conn, db_url: str
) -> None:
    """The claim holds the tenant's counter stripes, which everybody else takes after its usage
    row: it gates only when that row is free now, else leaves the calls assigned (gated later,
    after its commit, as any chunk). A claim of two tenants is not gated either."""
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=10, minute_limit=100)
    other, other_tpl = tenant(conn, call_limit=10, minute_limit=100)
    for u, t in ((user, tpl), (other, other_tpl)):
        schedule(conn, u, t)
    for _, aid in claim(conn):
        assert gate(conn, aid)[0]  # both periods' usage rows exist
    schedule(conn, user, tpl)
    with connect(db_url) as holder:
        holder.execute("BEGIN")
        holder.execute(
            "SELECT 1 FROM user_call_usage WHERE user_id = %s FOR NO KEY UPDATE", (user,)
        )
        conn.execute("SET lock_timeout = '5s'")  # a wait for the row fails, not hangs
        assert claim_and_gate(conn) == [("assigned", "assigned")]
        holder.execute("COMMIT")
    conn.execute("RESET lock_timeout")
    assert usage(conn, user)[0] == 1  # not gated: no dial counted yet
    schedule(conn, user, tpl)
    schedule(conn, other, other_tpl)
    assert sorted(claim_and_gate(conn)) == [("assigned", "assigned")] * 2


def test_a_call_committed_after_the_claims_statement_began_is_sent_whole(
    conn: Conn, db_url: str
) -> None:
    """The claim inside CLAIM_AND_GATE sees calls committed after the statement's snapshot was
    taken (a new snapshot per statement of the function); what their creates send must come
    from the function too, not from a join in the statement, which would not see them (the
    create went out without a number). A cursor declared before the call's commit runs the
    statement with the older snapshot, fetched after it."""
    make_provider(conn, max_calls=50)
    user, tpl = tenant(conn, call_limit=10, minute_limit=100)
    schedule(conn, user, tpl)
    gate(conn, claim(conn)[0][1])  # the period's usage row exists
    params = {"limit": 10, "worker": "w", "lease_seconds": 60, "gate": 5}
    with psycopg.connect(db_url) as early, early.cursor("claim", row_factory=dict_row) as cur:
        cur.execute(queries.CLAIM_AND_GATE, params)  # DECLARE: the statement's snapshot
        late = schedule(conn, user, tpl, recipient_phone="+15557654321")
        # due before the cursor's transaction began (its now()), committed after its snapshot
        conn.execute(
            "UPDATE call_queue SET scheduled_time = now() - interval '1 minute' WHERE id = %s",
            (late,),
        )
        rows = cur.fetchall()  # the function runs now and claims the call
    assert [(r["state"], r["recipient_phone"], r["recipient_name"]) for r in rows] == [
        ("dialing", "+15557654321", "John Doe")
    ]
    assert rows[0]["script"] is not None and rows[0]["provider_name"] is not None
