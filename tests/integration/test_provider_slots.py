"""Provider capacity as rows (provider_slots) and caller-ID pools.

* A stateful property test (hypothesis) over random claims (batch, the description's single
  path, three connections at once), dials, ends, releases and reaper runs on two providers, one
  with a pool of numbers each capped below the provider: after every step no provider carries
  more live assignments than max_concurrent_calls, no number more than its max_concurrent, the
  slots equal the live assignments (each with its slot's number) and reconcile finds no leak.
* Rotation: calls one at a time still go out from every number of a pool in turn.
* A bad pool is refused with CQ053 and writes nothing (SQL and ``callq providers sync``).
* The adapters send the number the slot gave the call (simulator, in process).
"""

from __future__ import annotations

import json
import threading
import uuid
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
from psycopg import sql

from providers.errors import ConfigError
from providers.simulator import Simulator
from worker import runtime, tasks
from worker.seed import schedule_calls, seed_demo

from .dbutil import Conn, connect, make_provider, make_template, make_user, one, slot_violations

POOL = [{"id": "num-a", "max_concurrent": 1}, {"id": "num-b", "max_concurrent": 2}, {"id": "num-c"}]
SINGLE = (
    "SELECT assign_call_to_provider(q.queue_id, get_best_available_provider())"
    " FROM get_next_call_in_queue() q"
)


def _set_pool(conn: Conn, provider: uuid.UUID, pool: Any) -> None:
    conn.execute(
        "UPDATE call_service_providers SET config = config || jsonb_build_object('caller_ids',"
        " %s::jsonb) WHERE id = %s",
        (json.dumps(pool), provider),
    )


class SlotMachine(RuleBasedStateMachine):
    """Two providers (one with a pool of three numbers), three connections."""

    assignments = Bundle("assignments")
    numbers_used: set[str] = set()  # over all examples: the test checks the pool was exercised

    def __init__(self, db_url: str) -> None:
        super().__init__()
        self.conns = [connect(db_url) for _ in range(3)]
        c = self.conns[0]
        for conn in self.conns:
            conn.execute("SET callq.retry_delay_scale = '0'")  # retries due at once
        c.execute("TRUNCATE call_queue CASCADE")  # each example starts empty (slots freed)
        if one(c, "SELECT count(*) FROM call_service_providers") == 0:
            pooled = make_provider(c, max_calls=5, priority=1)
            _set_pool(c, pooled, POOL)  # slots: num-a, num-b, num-c, num-b, num-c
            make_provider(c, max_calls=2, priority=1)
        self.user = make_user(c, call_limit=None, minute_limit=None, max_concurrent=1000)
        self.tpl = make_template(c, self.user)

    def teardown(self) -> None:
        rows = self.conns[0].execute("SELECT DISTINCT caller_id FROM call_assignments")
        SlotMachine.numbers_used |= {r[0] for r in rows.fetchall() if r[0]}
        for conn in self.conns:
            conn.close()

    @rule(n=st.integers(1, 4))
    def schedule(self, n: int) -> None:
        for _ in range(n):
            self.conns[0].execute(
                "SELECT schedule_call(%s, %s, 'T', '+15551234567')", (self.user, self.tpl)
            )

    @rule(target=assignments, c=st.integers(0, 2), n=st.integers(1, 5))
    def claim_batch(self, c: int, n: int) -> Any:
        rows = self.conns[c].execute("SELECT assignment_id FROM claim_and_assign_calls(%s)", (n,))
        return multiple(*[r[0] for r in rows.fetchall()])

    @rule(target=assignments, c=st.integers(0, 2))
    def claim_single(self, c: int) -> Any:
        rows = [r[0] for r in self.conns[c].execute(SINGLE).fetchall()]
        # a call claimed but left without a provider goes back to the queue at once
        self.conns[c].execute(
            "UPDATE call_queue SET status = 'queued', claimed_by = NULL, claimed_at = NULL,"
            " lease_expires_at = NULL WHERE status = 'claimed'"
        )
        return multiple(*[r for r in rows if r is not None])

    @rule(target=assignments, n=st.integers(1, 3), single=st.booleans())
    def claim_concurrently(self, n: int, single: bool) -> Any:
        barrier = threading.Barrier(3)
        got: list[uuid.UUID] = []
        errors: list[BaseException] = []

        def go(conn: Conn) -> None:
            try:
                barrier.wait(timeout=30)
                if single:
                    rows = conn.execute(SINGLE).fetchall()
                else:
                    rows = conn.execute(
                        "SELECT assignment_id FROM claim_and_assign_calls(%s)", (n,)
                    ).fetchall()
                got.extend(r[0] for r in rows if r[0] is not None)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(conn,)) for conn in self.conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        self.conns[0].execute(
            "UPDATE call_queue SET status = 'queued', claimed_by = NULL, claimed_at = NULL,"
            " lease_expires_at = NULL WHERE status = 'claimed'"
        )
        return multiple(*got)

    @rule(
        a=consumes(assignments), how=st.sampled_from(["complete", "busy", "release", "permanent"])
    )
    def finish(self, a: uuid.UUID, how: str) -> None:
        conn = self.conns[1]
        if how == "release":
            conn.execute("SELECT release_assignment(%s, 'shutdown')", (a,))
            return
        if one(conn, "SELECT mark_call_dialing(%s)", (a,)):
            if how == "complete":
                conn.execute("SELECT complete_call(%s, 30)", (a,))
            else:
                conn.execute("SELECT handle_failed_call(%s, %s)", (a, how))

    @rule(a=assignments)
    def dial(self, a: uuid.UUID) -> None:
        self.conns[2].execute("SELECT mark_call_dialing(%s)", (a,))

    @invariant()
    def slots_hold(self) -> None:
        conn = self.conns[0]
        assert slot_violations(conn) == []
        assert one(conn, "SELECT reconcile_provider_slots()") == 0


def test_slot_invariants_hold_under_random_sequences(db_url: str) -> None:
    SlotMachine.numbers_used = set()
    run_state_machine_as_test(
        lambda: SlotMachine(db_url),
        settings=settings(
            max_examples=12,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert SlotMachine.numbers_used == {"num-a", "num-b", "num-c"}


def test_numbers_take_turns_even_one_call_at_a_time(conn: Conn) -> None:
    p = make_provider(conn, max_calls=6)
    _set_pool(conn, p, [{"id": "n1"}, {"id": "n2"}, {"id": "n3"}])
    user = make_user(conn, call_limit=None)
    tpl = make_template(conn, user)
    used = []
    for _ in range(6):
        conn.execute("SELECT schedule_call(%s, %s, 'T', '+15551234567')", (user, tpl))
        [(aid,)] = conn.execute("SELECT assignment_id FROM claim_and_assign_calls(1)").fetchall()
        used.append(one(conn, "SELECT caller_id FROM call_assignments WHERE id = %s", (aid,)))
        assert one(conn, "SELECT mark_call_dialing(%s)", (aid,))
        conn.execute("SELECT complete_call(%s, 10)", (aid,))
    assert used == ["n1", "n2", "n3", "n1", "n2", "n3"]
    assert slot_violations(conn) == []


@pytest.mark.parametrize(
    ("pool", "word"),
    [
        ("not a list", "array"),
        ([], "array"),
        (["num-a"], "object"),
        ([{"id": ""}], "object"),
        ([{"id": 5}], "object"),
        ([{"id": "a", "extra": 1}], "object"),
        ([{"id": "a", "max_concurrent": 0}], "max_concurrent"),
        ([{"id": "a", "max_concurrent": 1.5}], "max_concurrent"),
        ([{"id": "a", "max_concurrent": "2"}], "max_concurrent"),
        ([{"id": "a"}, {"id": "a"}], "twice"),
    ],
)
def test_a_bad_pool_is_refused_and_writes_nothing(conn: Conn, pool: Any, word: str) -> None:
    p = make_provider(conn, max_calls=3)
    before = conn.execute("SELECT config FROM call_service_providers WHERE id = %s", (p,))
    config = before.fetchone()
    layout = conn.execute("SELECT * FROM provider_slots ORDER BY slot_no").fetchall()
    with pytest.raises(psycopg.Error) as err:
        _set_pool(conn, p, pool)
    assert err.value.sqlstate == "CQ053" and word in str(err.value)
    assert "num-a" not in str(err.value)  # never a number in a message
    after = conn.execute("SELECT config FROM call_service_providers WHERE id = %s", (p,))
    assert after.fetchone() == config
    assert conn.execute("SELECT * FROM provider_slots ORDER BY slot_no").fetchall() == layout
    with pytest.raises(psycopg.Error) as err:
        conn.execute(
            "INSERT INTO call_service_providers (name, provider_type, api_key, base_url, config)"
            " VALUES ('pooled', 'vapi', 'k', 'https://api.vapi.ai', %s)",
            (json.dumps({"caller_ids": pool}),),
        )
    assert err.value.sqlstate == "CQ053"
    assert one(conn, "SELECT count(*) FROM call_service_providers WHERE name = 'pooled'") == 0


def test_providers_sync_refuses_a_bad_pool_and_writes_nothing(db_url: str) -> None:
    from worker.providers_cli import ProviderSpec, apply
    from worker.settings import Settings

    pool = [{"id": "pn-1"}, {"id": "pn-2"}]
    good = {"name": "Vapi A", "type": "vapi", "base_url": "https://api.vapi.ai",
            "api_key": "env:CALLQ_SECRET_VAPI", "max_concurrent_calls": 4,
            "config": {"phone_number_id": "pn", "caller_ids": pool}}  # fmt: skip
    bad = {**good, "name": "Vapi B", "config": {"caller_ids": [{"id": "pn-1", "max": 2}]}}
    with psycopg.connect(db_url, autocommit=True) as conn:
        with pytest.raises(ConfigError, match=r"Vapi B.*caller_ids"):
            apply(conn, [ProviderSpec.from_mapping(r, "t") for r in (good, bad)], Settings())
        assert one(conn, "SELECT count(*) FROM call_service_providers") == 0
        assert apply(conn, [ProviderSpec.from_mapping(good, "t")], Settings()) == 0
        rows = conn.execute("SELECT caller_id FROM provider_slots ORDER BY slot_no").fetchall()
        assert [r[0] for r in rows] == ["pn-1", "pn-2", "pn-1", "pn-2"]


@pytest.mark.parametrize(("kind", "field"), [("vapi", "phoneNumberId"),
                                             ("synthflow", "from_phone_number"),
                                             ("retell", "from_number")])  # fmt: skip
def test_the_adapter_dials_from_the_number_of_its_slot(
    worker_db: str, sim: Simulator, kind: str, field: str
) -> None:
    sim.configure({"outcome_mix": {"completed": 1.0}, "answer_at_once": True})
    pool = [{"id": "+14155550101"}, {"id": "+14155550102"}]
    with psycopg.connect(worker_db, autocommit=True) as conn:
        seeded = seed_demo(conn, sim_base_url=sim.base_url, providers=(kind,))
        conn.execute("UPDATE call_service_providers SET is_active = (provider_type = %s)", (kind,))
        _set_pool(conn, seeded.provider_ids[kind], pool)
        schedule_calls(conn, seeded, 2)
    assigned = runtime.database().claim_and_assign(2, "test-worker", 60)
    assert len(assigned) == 2
    tasks.dispatch_chunk([str(a.assignment_id) for a in assigned])
    with psycopg.connect(worker_db) as conn:
        given = dict(
            conn.execute(
                "SELECT q.id::text, a.caller_id FROM call_assignments a"
                " JOIN call_queue q ON q.id = a.queue_id"
            ).fetchall()
        )
    sent = {c.queue_id: c.request.get(field) for c in sim.engine.list(kind)}
    assert sorted(given.values()) == ["+14155550101", "+14155550102"]
    assert sent == given


def test_capacity_changes_under_load_never_add_room_beyond_the_new_capacity(db_url: str) -> None:
    """Workers claim and end calls while ops change the provider's max_concurrent_calls and pool
    again and again: in every snapshot a claim may take a slot only where the calls in flight
    leave room under the current capacity (calls beyond a lowered capacity block new ones until
    they end), and when the calls are done the slots are exactly the layout again (nothing
    retired, nothing leaked)."""
    layouts = [(5, POOL), (2, None), (3, [{"id": "num-a"}, {"id": "num-d", "max_concurrent": 1}]),
               (1, None), (6, POOL), (4, None)]  # fmt: skip
    with connect(db_url) as conn:
        provider = make_provider(conn, max_calls=5)
        user = make_user(conn, call_limit=None, minute_limit=None, max_concurrent=1000)
        tpl = make_template(conn, user)
        for _ in range(120):
            conn.execute("SELECT schedule_call(%s, %s, 'T', '+15551234567')", (user, tpl))
    stop = threading.Event()
    bad: list[Any] = []
    errors: list[BaseException] = []
    # slots a claim may take now, calls on the provider, the capacity: in one snapshot
    room = (
        "SELECT l.available_slots, l.current_calls,"
        " (SELECT count(*) FROM provider_slot_layout(p.max_concurrent_calls, p.config))"
        " FROM provider_load l JOIN call_service_providers p ON p.id = l.provider_id"
        " WHERE p.id = %s"
    )

    def guarded(fn: Any) -> Any:
        def run(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        return run

    @guarded
    def watch() -> None:
        with connect(db_url) as conn:
            while not stop.is_set():
                row = conn.execute(room, (provider,)).fetchone()
                if row is not None and row[0] > max(row[2] - row[1], 0):
                    bad.append(tuple(row))

    @guarded
    def relayout() -> None:
        with connect(db_url) as conn:
            for i in range(30):
                if stop.is_set():
                    return
                size, pool = layouts[i % len(layouts)]
                conn.execute(
                    "UPDATE call_service_providers SET max_concurrent_calls = %s,"
                    " config = CASE WHEN %s::jsonb IS NULL THEN config - 'caller_ids'"
                    " ELSE config || jsonb_build_object('caller_ids', %s::jsonb) END WHERE id = %s",
                    (size, json.dumps(pool) if pool else None,
                     json.dumps(pool) if pool else None, provider),
                )  # fmt: skip

    @guarded
    def work(seed: int) -> None:
        with connect(db_url) as conn:
            conn.execute("SET callq.retry_delay_scale = '0'")
            n = seed
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT assignment_id FROM claim_and_assign_calls(%s)", (1 + n % 3,)
                ).fetchall()
                left = "SELECT count(*) FROM call_queue WHERE status <> 'completed'"
                if not rows and one(conn, left) == 0:
                    return
                for (aid,) in rows:
                    n += 1
                    if n % 5 == 0:
                        conn.execute("SELECT release_assignment(%s, 'shutdown')", (aid,))
                    elif one(conn, "SELECT mark_call_dialing(%s)", (aid,)):
                        conn.execute("SELECT complete_call(%s, 5)", (aid,))

    watcher = threading.Thread(target=watch)
    changer = threading.Thread(target=relayout)
    workers = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    watcher.start()
    changer.start()
    for t in workers:
        t.start()
    changer.join(timeout=120)
    for t in workers:
        t.join(timeout=120)
    stop.set()
    watcher.join(timeout=30)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in (watcher, changer, *workers)), "a thread hung"
    assert not bad, bad[:5]
    with connect(db_url) as conn:
        assert one(conn, "SELECT count(*) FROM call_queue WHERE status <> 'completed'") == 0
        assert one(conn, "SELECT count(*) FROM provider_slots WHERE retired") == 0
        assert one(conn, "SELECT reconcile_provider_slots()") == 0
        assert slot_violations(conn) == []


def test_no_slot_is_taken_while_calls_beyond_a_lowered_capacity_are_in_flight(
    db_url: str,
) -> None:
    with connect(db_url) as conn, psycopg.connect(db_url) as rival:
        p = make_provider(conn, max_calls=2)
        user = make_user(conn, call_limit=None)
        tpl = make_template(conn, user)
        for _ in range(3):
            conn.execute("SELECT schedule_call(%s, %s, 'T', '+15551234567')", (user, tpl))
        rows = conn.execute("SELECT assignment_id FROM claim_and_assign_calls(2)").fetchall()
        (a1,), (a2,) = rows
        conn.execute(
            "UPDATE call_service_providers SET max_concurrent_calls = 1 WHERE id = %s", (p,)
        )
        assert one(conn, "SELECT count(*) FROM provider_slots WHERE retired") == 1
        # the retired slot is busy elsewhere (locked), so a1's slot cannot go to its call: it is
        # freed, yet nothing may take it while the provider is still over its capacity
        rival.execute("SELECT 1 FROM provider_slots WHERE retired FOR UPDATE")
        one(conn, "SELECT release_assignment(%s, 'shutdown')", (a1,))
        assert one(conn, "SELECT count(*) FROM provider_slots WHERE assignment_id IS NULL") == 1
        rival.rollback()
        load = "SELECT current_calls, available_slots FROM provider_load WHERE provider_id = %s"
        assert conn.execute(load, (p,)).fetchone() == (1, 0)
        assert one(conn, "SELECT get_best_available_provider()") is None
        assert conn.execute("SELECT * FROM claim_and_assign_calls(5)").fetchall() == []
        one(conn, "SELECT release_assignment(%s, 'shutdown')", (a2,))  # the retired slot goes
        assert conn.execute(load, (p,)).fetchone() == (0, 1)
        assert len(conn.execute("SELECT * FROM claim_and_assign_calls(5)").fetchall()) == 1
        assert slot_violations(conn) == []


def test_an_ending_finds_retired_slots_in_one_probe_whatever_the_statistics(conn: Conn) -> None:
    """free_provider_slot asks for the provider's highest retired slot at every ending. Its plan
    must not walk the provider's slots: planned before any ANALYZE, the look-up once went
    backwards through every slot of the provider (1.7 ms per ending with 15,000 slots)."""
    p = make_provider(conn, max_calls=5000)
    conn.execute(
        "PREPARE retired(uuid) AS SELECT x.slot_no FROM provider_slots x"
        " WHERE x.provider_id = $1 AND x.retired ORDER BY x.slot_no DESC LIMIT 1"
    )
    conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        for analyze in (False, True):
            if analyze:
                conn.execute("ANALYZE provider_slots")
            plan = one(
                conn,
                sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE retired({})").format(
                    sql.Literal(str(p))
                ),
            )
            top = plan[0]["Plan"]
            pages = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
            assert pages <= 3, (analyze, pages)
    finally:
        conn.execute("RESET plan_cache_mode")
        conn.execute("DEALLOCATE retired")
