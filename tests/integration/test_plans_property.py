"""Stateful property test of the plan invariants (hypothesis RuleBasedStateMachine).

Random sequences of schedules, claims (also three at once, from three connections), dial gates,
placements, completions, failures with retries and failovers, releases, cancels and reaper
runs, for two tenants on small plans (some with calls per minute), with a pinned clock that a
rule moves on. After every step, for each tenant:

    dials counted (calls_made, with the pending rows) never exceed call_limit, and equal the
    attempts that passed the gate and were not given back (also for plans without limits, whose
    gate chunks count dials as pending rows);
    minutes billed, and billed + reserved, never exceed minute_limit (durations within the
    max duration sent, plus the 5 s margin);
    calls in flight never exceed max_concurrent_calls (plain calls and paced campaigns' alike);
    with calls_per_minute, no 60 s window of claim times holds more than the rate (plus the
    burst less one);
    minutes billed (user_call_usage_live: the period's row plus the endings not folded into it
    yet) equal the minutes of every ending so far, rounded up per call, whether the ending
    folded itself, waited for the next gate (it ended while another transaction held the row),
    or for a fold; after beat's reconcile nothing is pending and the row alone is exact;
    tenant counters and reserved minutes equal a recount; provider slots equal live assignments.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from psycopg.types.json import Jsonb

from .dbutil import Conn, connect, make_provider, make_template, one, set_clock, slot_violations

LIVE = ("assigned", "dialing", "placed")
KINDS = ("busy", "no_answer", "voicemail", "provider_error", "rate_limited", "permanent")


def _tenant(
    conn: Conn,
    call_limit: int | None,
    minute_limit: int | None,
    cap: int,
    per_call: int,
    rate: int | None,
) -> Any:
    uid = uuid.uuid4()
    conn.execute("INSERT INTO auth.users (id, email) VALUES (%s, %s)", (uid, f"{uid.hex}@x.io"))
    plan = one(
        conn,
        "INSERT INTO subscription_plans (name, call_limit, minute_limit, max_concurrent_calls,"
        " max_call_minutes, calls_per_minute) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
        (f"p-{uid.hex[:10]}", call_limit, minute_limit, cap, per_call, rate),
    )
    conn.execute("INSERT INTO user_subscriptions (user_id, plan_id) VALUES (%s, %s)", (uid, plan))
    return uid, make_template(conn, uid), (call_limit, minute_limit, cap, rate)


class PlanMachine(RuleBasedStateMachine):
    """Two tenants, two providers, three connections."""

    assignments = Bundle("assignments")

    def __init__(self, db_url: str) -> None:
        super().__init__()
        self.conns = [connect(db_url) for _ in range(3)]
        # holds a period's usage row, as a gate does through its commit
        self.holder = connect(db_url)
        c = self.conns[0]
        for conn in self.conns:
            conn.execute("SET callq.retry_delay_scale = '0'")
            conn.execute("SET statement_timeout = '30s'")  # a wait on the holder fails, not hangs
        self.tenants: list[Any] = []
        # each example starts from an empty queue (tenants are new each time)
        c.execute("TRUNCATE call_queue CASCADE")  # frees every provider slot
        c.execute("UPDATE user_call_usage SET minutes_reserved = 0")
        c.execute("TRUNCATE user_call_usage_deltas")
        self.billed: dict[Any, int] = {}  # minutes each tenant's endings reported, rounded up
        # the claim's clock (callq_now) is pinned and moved by the tick rule: claim times are
        # exact, for the calls-per-minute invariant
        self.now = one(c, "SELECT date_trunc('second', now())")
        set_clock(c, self.now)
        self.claims: dict[Any, list[datetime]] = {}
        if one(c, "SELECT count(*) FROM call_service_providers") == 0:
            make_provider(c, max_calls=3, priority=1)
            make_provider(c, max_calls=4, priority=2)

    def teardown(self) -> None:
        set_clock(self.conns[0], None)
        for conn in [*self.conns, self.holder]:
            conn.close()

    def _record(self, conn: Conn, queue_ids: list[Any]) -> None:
        """Note the claim time of each call taken (per tenant)."""
        if queue_ids:
            rows = conn.execute(
                "SELECT user_id FROM call_queue WHERE id = ANY(%s)", (queue_ids,)
            ).fetchall()
            for (uid,) in rows:
                self.claims.setdefault(uid, []).append(self.now)

    @rule(seconds=st.integers(0, 45))
    def tick(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)
        set_clock(self.conns[0], self.now)

    @rule(
        call_limit=st.integers(1, 6),
        minute_limit=st.integers(1, 8),
        # a plan without call and minute limits: its gate chunks count their dials as a
        # pending row of the period
        unlimited=st.booleans(),
        cap=st.integers(1, 3),
        per_call=st.integers(1, 4),
        rate=st.sampled_from([None, 1, 2, 3, 150]),
    )
    def add_tenant(
        self,
        call_limit: int,
        minute_limit: int,
        unlimited: bool,
        cap: int,
        per_call: int,
        rate: int | None,
    ) -> None:
        if len(self.tenants) < 2:
            limits = (None, None) if unlimited else (call_limit, minute_limit)
            self.tenants.append(_tenant(self.conns[0], *limits, cap, per_call, rate))

    @rule(t=st.integers(0, 1), c=st.integers(0, 2), n=st.integers(1, 3))
    def schedule(self, t: int, c: int, n: int) -> None:
        if t >= len(self.tenants):
            return
        uid, tpl, _ = self.tenants[t]
        conn = self.conns[c]
        for _ in range(n):
            before = one(conn, "SELECT count(*) FROM call_queue WHERE user_id = %s", (uid,))
            try:
                conn.execute("SELECT schedule_call(%s, %s, 'T', '+15551234567')", (uid, tpl))
            except psycopg.Error as exc:
                assert exc.sqlstate in ("CQ003", "CQ030"), exc.sqlstate
                after = one(conn, "SELECT count(*) FROM call_queue WHERE user_id = %s", (uid,))
                assert after == before  # a refusal writes nothing

    @rule(
        t=st.integers(0, 1),
        n=st.integers(1, 4),
        per_minute=st.sampled_from([None, 6, 600, 100000]),
        in_flight=st.sampled_from([None, 1, 50]),
    )
    def schedule_campaign(
        self, t: int, n: int, per_minute: int | None, in_flight: int | None
    ) -> None:
        """A running campaign, paced or not: a paced one's calls take the claim's lane."""
        if t >= len(self.tenants):
            return
        uid, tpl, _ = self.tenants[t]
        conn = self.conns[0]
        camp = one(conn, "SELECT create_campaign(%s, %s, 'C', 'running')", (uid, tpl))
        if per_minute or in_flight:
            conn.execute("SELECT set_campaign_pacing(%s, %s, %s)", (camp, per_minute, in_flight))
        rows = [{"name": "C", "phone": "+15551234567"} for _ in range(n)]
        conn.execute("SELECT count(*) FROM schedule_calls(%s, %s)", (camp, Jsonb(rows)))

    @rule(c=st.integers(0, 2), n=st.integers(1, 4))
    def claim_due(self, c: int, n: int) -> None:
        """The claim without provider assignment (claim_due_calls), as a poller uses it."""
        conn = self.conns[c]
        conn.execute("UPDATE call_queue SET scheduled_time = callq_now() WHERE status = 'queued'")
        rows = conn.execute("SELECT queue_id FROM claim_due_calls(%s, 'p', 60)", (n,)).fetchall()
        self._record(conn, [r[0] for r in rows])

    @rule(target=assignments, c=st.integers(0, 2), n=st.integers(1, 4))
    def claim(self, c: int, n: int) -> Any:
        conn = self.conns[c]
        conn.execute("UPDATE call_queue SET scheduled_time = callq_now() WHERE status = 'queued'")
        rows = conn.execute("SELECT queue_id, assignment_id FROM claim_and_assign_calls(%s)", (n,))
        got = rows.fetchall()
        self._record(conn, [r[0] for r in got])
        return multiple(*[r[1] for r in got])

    @rule(n=st.integers(1, 3))
    def claim_concurrently(self, n: int) -> None:
        self.conns[0].execute(
            "UPDATE call_queue SET scheduled_time = callq_now() WHERE status = 'queued'"
        )
        barrier = threading.Barrier(3)
        taken: list[Any] = []

        def work(conn: Conn) -> None:
            barrier.wait(timeout=10)
            rows = conn.execute("SELECT queue_id FROM claim_and_assign_calls(%s)", (n,))
            taken.extend(r[0] for r in rows.fetchall())

        threads = [threading.Thread(target=work, args=(c,)) for c in self.conns]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=30)
        self._record(self.conns[0], taken)

    def _live(self, c: int) -> list[Any]:
        return (
            self.conns[c]
            .execute(
                "SELECT a.id, a.state, a.max_duration_seconds FROM call_assignments a"
                " JOIN call_queue q ON q.id = a.queue_id"
                " WHERE a.state IN ('assigned', 'dialing', 'placed') ORDER BY a.created_at"
            )
            .fetchall()
        )

    @rule(c=st.integers(0, 2), pick=st.integers(0, 20))
    def gate(self, c: int, pick: int) -> None:
        live = [r for r in self._live(c) if r[1] == "assigned"]
        if live:
            aid = live[pick % len(live)][0]
            self.conns[c].execute("SELECT * FROM dial_gate(%s)", (aid,)).fetchall()

    @rule(c=st.integers(0, 2), pick=st.integers(0, 20))
    def place(self, c: int, pick: int) -> None:
        live = [r for r in self._live(c) if r[1] == "dialing"]
        if live:
            aid = live[pick % len(live)][0]
            self.conns[c].execute("SELECT mark_call_placed(%s, %s)", (aid, f"pc-{aid}"))

    def _duration(self, cap: int | None, frac: float) -> float:
        return frac * ((cap + 5) if cap else 900)

    def _bill(self, aid: Any, seconds: float) -> None:
        """Note what ending a live attempt bills (rounded by the database's own rule)."""
        conn = self.conns[0]
        uid = one(
            conn,
            "SELECT q.user_id FROM call_assignments a JOIN call_queue q ON q.id = a.queue_id"
            " WHERE a.id = %s",
            (aid,),
        )
        minutes = one(conn, "SELECT ceil(greatest(%s::float8, 0)::numeric / 60)::int", (seconds,))
        self.billed[uid] = self.billed.get(uid, 0) + minutes

    @rule(c=st.integers(0, 2), pick=st.integers(0, 20), frac=st.floats(0, 1), dup=st.booleans())
    def complete(self, c: int, pick: int, frac: float, dup: bool) -> None:
        live = [r for r in self._live(c) if r[1] in ("dialing", "placed")]
        if live:
            aid, _, cap = live[pick % len(live)]
            for _ in range(2 if dup else 1):
                self.conns[c].execute(
                    "SELECT complete_call(%s, %s)", (aid, self._duration(cap, frac))
                )
            self._bill(aid, self._duration(cap, frac))

    @rule(
        c=st.integers(0, 2),
        pick=st.integers(0, 20),
        kind=st.sampled_from(KINDS),
        frac=st.floats(0, 1),
    )
    def fail(self, c: int, pick: int, kind: str, frac: float) -> None:
        live = [r for r in self._live(c) if r[1] in ("dialing", "placed")]
        if live:
            aid, _, cap = live[pick % len(live)]
            self.conns[c].execute(
                "SELECT handle_failed_call(%s, %s, NULL, 0, %s)",
                (aid, kind, self._duration(cap, frac)),
            )
            self._bill(aid, self._duration(cap, frac))

    @rule(
        c=st.integers(0, 2),
        pick=st.integers(0, 20),
        kind=st.sampled_from(("completed", *KINDS)),
        frac=st.floats(0, 1),
    )
    def end_while_the_period_row_is_held(self, c: int, pick: int, kind: str, frac: float) -> None:
        """An ending while another transaction holds the period's usage row (a gate of the
        tenant, through its commit): it does not wait for it; its minutes stay pending."""
        live = [r for r in self._live(c) if r[1] in ("dialing", "placed")]
        if not live:
            return
        aid, _, cap = live[pick % len(live)]
        seconds = self._duration(cap, frac)
        self.holder.execute("BEGIN")
        try:
            self.holder.execute(
                "SELECT 1 FROM user_call_usage u JOIN call_assignments a ON a.usage_id = u.id"
                " WHERE a.id = %s FOR NO KEY UPDATE OF u",
                (aid,),
            )
            if kind == "completed":
                self.conns[c].execute("SELECT complete_call(%s, %s)", (aid, seconds))
            else:
                self.conns[c].execute(
                    "SELECT handle_failed_call(%s, %s, NULL, 0, %s)", (aid, kind, seconds)
                )
        finally:
            self.holder.execute("COMMIT")
        self._bill(aid, seconds)

    @rule(c=st.integers(0, 2), pick=st.integers(0, 20))
    def gate_while_the_period_row_is_held(self, c: int, pick: int) -> None:
        """A gate of a plan without limits while another transaction holds the period's usage
        row: it does not wait for it; its dial stays pending. (A plan with limits waits: its
        gate must read the row.)"""
        live = [r for r in self._live(c) if r[1] == "assigned"]
        if not live:
            return
        aid = live[pick % len(live)][0]
        unlimited = one(
            self.conns[0],
            "SELECT p.call_limit IS NULL AND p.minute_limit IS NULL"
            " FROM call_assignments a JOIN call_queue q ON q.id = a.queue_id"
            " JOIN tenant_plan(q.user_id) p ON true WHERE a.id = %s",
            (aid,),
        )
        if not unlimited:
            return
        self.holder.execute("BEGIN")
        try:
            self.holder.execute(
                "SELECT 1 FROM user_call_usage u JOIN call_queue q ON q.user_id = u.user_id"
                " JOIN call_assignments a ON a.queue_id = q.id"
                " WHERE a.id = %s FOR NO KEY UPDATE OF u",
                (aid,),
            )
            self.conns[c].execute("SELECT * FROM dial_gate(%s)", (aid,)).fetchall()
        finally:
            self.holder.execute("COMMIT")

    @rule(c=st.integers(0, 2))
    def fold(self, c: int) -> None:
        """Pending endings folded into their periods' rows (as a gate or beat does)."""
        self.conns[c].execute("SELECT fold_call_usage(id) FROM user_call_usage ORDER BY user_id")

    @rule(c=st.integers(0, 2), pick=st.integers(0, 20))
    def release(self, c: int, pick: int) -> None:
        live = [r for r in self._live(c) if r[1] in ("assigned", "dialing")]
        if live:
            aid = live[pick % len(live)][0]
            self.conns[c].execute("SELECT release_assignment(%s, 'connect_error')", (aid,))

    @rule(a=consumes(assignments))
    def duplicate_gate(self, a: Any) -> None:
        """A redelivered dispatch: the gate never lets a second dial through."""
        row = self.conns[1].execute("SELECT won FROM dial_gate(%s)", (a,)).fetchone()
        state = one(self.conns[1], "SELECT state FROM call_assignments WHERE id = %s", (a,))
        if row and row[0]:
            assert state == "dialing"

    @rule()
    def cancel_one(self) -> None:
        self.conns[2].execute(
            "UPDATE call_queue SET status = 'canceled' WHERE id ="
            " (SELECT id FROM call_queue WHERE status = 'queued' LIMIT 1)"
        )

    @rule()
    def reap(self) -> None:
        self.conns[0].execute(
            "UPDATE call_queue SET lease_expires_at = now() - interval '1 second'"
            " WHERE status IN ('claimed', 'assigned')"
        )
        self.conns[0].execute("SELECT * FROM reap_expired_leases()").fetchall()

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def billed_minutes_are_exact(self) -> None:
        """Checked first (invariants run by name): before the recount's fold, so pending
        endings are still pending here."""
        conn = self.conns[0]
        for uid, *_ in self.tenants:
            minutes = one(
                conn,
                "SELECT coalesce(sum(minutes_used), 0) FROM user_call_usage_live"
                " WHERE user_id = %s",
                (uid,),
            )
            assert minutes == self.billed.get(uid, 0)

    @invariant()
    def plan_holds(self) -> None:
        conn = self.conns[0]
        for uid, _, (call_limit, minute_limit, cap, _rate) in self.tenants:
            row = conn.execute(
                "SELECT coalesce(sum(calls_made), 0), coalesce(sum(minutes_used), 0),"
                " coalesce(sum(minutes_reserved), 0) FROM user_call_usage_live"
                " WHERE user_id = %s",
                (uid,),
            ).fetchone()
            assert row is not None
            dials, minutes, reserved = (int(x) for x in row)
            assert call_limit is None or dials <= call_limit
            assert minute_limit is None or minutes + reserved <= minute_limit
            counted = one(
                conn,
                "SELECT count(*) FROM call_assignments a JOIN call_queue q ON q.id = a.queue_id"
                " WHERE q.user_id = %s AND a.dialing_at IS NOT NULL AND a.state <> 'released'",
                (uid,),
            )
            assert dials == counted  # every dial counted, once
            in_flight = one(
                conn,
                "SELECT count(*) FROM call_queue WHERE user_id = %s"
                " AND status IN ('claimed', 'assigned', 'dialing', 'in_progress')",
                (uid,),
            )
            assert in_flight <= cap

    @invariant()
    def calls_per_minute_hold(self) -> None:
        """At most the plan's rate plus its burst less one (one second's worth, at least 1)
        claims in any 60 s window of claim times."""
        for uid, _, (*_, rate) in self.tenants:
            if rate is None:
                continue
            bound = rate + max(rate // 60, 1) - 1
            times = sorted(self.claims.get(uid, []))
            for i, t in enumerate(times):
                in_window = sum(1 for u in times[i:] if u < t + timedelta(seconds=60))
                assert in_window <= bound, (rate, in_window)

    @invariant()
    def counters_and_slots_match_a_recount(self) -> None:
        conn = self.conns[0]
        assert one(conn, "SELECT reconcile_tenant_counters()") == 0
        # the recount folded every pending ending: the period rows alone are exact
        assert one(conn, "SELECT count(*) FROM user_call_usage_deltas") == 0
        assert (
            one(
                conn,
                "SELECT count(*) FROM user_call_usage u JOIN user_call_usage_live l USING (id)"
                " WHERE (u.minutes_used, u.minutes_reserved)"
                " <> (l.minutes_used, l.minutes_reserved)",
            )
            == 0
        )
        assert one(conn, "SELECT reconcile_provider_slots()") == 0
        assert slot_violations(conn) == []


def _run(db_url: str, examples: int, steps: int) -> None:
    run_state_machine_as_test(
        lambda: PlanMachine(db_url),
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


def test_plan_invariants_hold_under_random_sequences(db_url: str) -> None:
    _run(db_url, examples=25, steps=30)


@pytest.mark.slow
def test_plan_invariants_hold_under_long_random_sequences(db_url: str) -> None:
    _run(db_url, examples=200, steps=60)
