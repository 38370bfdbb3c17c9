"""The call-event log: what the triggers write for each transition, record_call_event, RLS,
append-only privileges, retention, the ops views, and Realtime's publication + RLS."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .dbutil import Conn, as_role, make_provider, make_template, make_user, one, schedule

Setup = tuple[uuid.UUID, uuid.UUID]


@pytest.fixture
def setup(conn: Conn) -> Setup:
    user = make_user(conn, call_limit=None)
    return user, make_template(conn, user)


def events(conn: Conn, qid: uuid.UUID) -> list[tuple[Any, ...]]:
    """(kind, attempt, provider_id, outcome) of one call, in order."""
    return conn.execute(
        "SELECT kind, attempt, provider_id, outcome FROM call_events WHERE queue_id = %s"
        " ORDER BY id",
        (qid,),
    ).fetchall()


def kinds(conn: Conn, qid: uuid.UUID) -> list[str]:
    return [e[0] for e in events(conn, qid)]


def sqlstate(conn: Conn, query: str, params: Any = None) -> str | None:
    try:
        with conn.transaction():
            conn.execute(query, params)
    except psycopg.Error as exc:
        return str(exc.sqlstate)
    return None


def test_batch_claim_to_completion_logs_every_step(conn: Conn, setup: Setup) -> None:
    p = make_provider(conn, max_calls=10)
    qids = [schedule(conn, *setup) for _ in range(5)]
    claimed = conn.execute("SELECT * FROM claim_and_assign_calls(10, 'w1', 60)").fetchall()
    assert len(claimed) == 5
    for _, aid, _ in claimed:
        assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is True
        assert one(conn, "SELECT mark_call_placed(%s, %s)", (aid, f"pc-{aid}")) is True
        one(conn, "SELECT complete_call(%s, 30)", (aid,))
    for qid in qids:
        assert events(conn, qid) == [
            ("scheduled", 0, None, None),
            ("assigned", 1, p, None),
            ("dialing", 1, p, None),
            ("placed", 1, p, None),
            ("ended", 1, p, "completed"),
            ("completed", 1, None, None),
        ]
    # times are the state change's own; dialing carries when the call was due
    row = conn.execute(
        "SELECT e.created_at = a.dialing_at, e.due_at = q.scheduled_time, e.assignment_id = a.id"
        " FROM call_events e JOIN call_assignments a ON a.queue_id = e.queue_id"
        " JOIN call_queue q ON q.id = e.queue_id WHERE e.kind = 'dialing' AND e.queue_id = %s",
        (qids[0],),
    ).fetchone()
    assert row == (True, True, True)
    assert one(conn, "SELECT count(DISTINCT user_id) FROM call_events") == 1


def test_retry_failover_and_final_failure(conn: Conn, setup: Setup) -> None:
    p1 = make_provider(conn, priority=1)
    p2 = make_provider(conn, priority=2)
    qid = schedule(conn, *setup)

    def attempt_and_fail(provider: uuid.UUID, kind: str) -> None:
        conn.execute("UPDATE call_queue SET scheduled_time = now() WHERE id = %s", (qid,))
        aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (qid, provider))
        assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is True
        one(conn, "SELECT handle_failed_call(%s, %s, 'boom')", (aid, kind))

    attempt_and_fail(p1, "busy")
    assert kinds(conn, qid)[-2:] == ["ended", "retried"]
    due = conn.execute(
        "SELECT e.due_at = q.scheduled_time FROM call_events e JOIN call_queue q"
        " ON q.id = e.queue_id WHERE e.queue_id = %s AND e.kind = 'retried'",
        (qid,),
    ).fetchone()
    assert due == (True,)
    attempt_and_fail(p1, "provider_error")
    assert events(conn, qid)[-2:] == [
        ("ended", 2, p1, "provider_error"),
        ("failed_over", 2, None, None),
    ]
    attempt_and_fail(p2, "no_answer")  # third and last attempt
    assert events(conn, qid)[-2:] == [("ended", 3, p2, "no_answer"), ("failed", 3, None, None)]
    detail = one(
        conn, "SELECT detail FROM call_events WHERE queue_id = %s AND kind = 'failed'", (qid,)
    )
    assert detail == {"reason": "boom"}


def test_claim_reap_release_and_cancel(conn: Conn, setup: Setup) -> None:
    p = make_provider(conn)
    q1 = schedule(conn, *setup)
    assert one(conn, "SELECT count(*) FROM claim_due_calls(1, 'w', 60)") == 1
    conn.execute(
        "UPDATE call_queue SET lease_expires_at = now() - interval '1 s' WHERE id = %s", (q1,)
    )
    conn.execute("SELECT * FROM reap_expired_leases()").fetchall()
    assert kinds(conn, q1) == ["scheduled", "claimed", "requeued"]

    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (q1, p))
    assert one(conn, "SELECT release_assignment(%s, 'provider_unavailable')", (aid,)) is True
    assert kinds(conn, q1)[-3:] == ["assigned", "released", "requeued"]
    detail = one(
        conn, "SELECT detail FROM call_events WHERE queue_id = %s AND kind = 'released'", (q1,)
    )
    assert detail == {"reason": "provider_unavailable"}

    # the worker role may not write call_events itself: the trigger writes as the owner
    with as_role(conn, "callq_worker"):
        conn.execute("UPDATE call_queue SET status = 'canceled' WHERE id = %s", (q1,))
        assert kinds(conn, q1)[-1] == "canceled"
        assert sqlstate(conn, "UPDATE call_events SET kind = kind") == "42501"
        assert sqlstate(conn, "DELETE FROM call_events") == "42501"
    # an update that changes no status (a poll, a lease) writes nothing
    before = one(conn, "SELECT count(*) FROM call_events")
    conn.execute("UPDATE call_queue SET priority = 2")
    conn.execute("UPDATE call_assignments SET poll_count = poll_count + 1")
    assert one(conn, "SELECT count(*) FROM call_events") == before


def test_record_call_event(conn: Conn, setup: Setup) -> None:
    p = make_provider(conn)
    qid = schedule(conn, *setup)
    held = one(
        conn, "SELECT record_call_event(%s, 'held', %s)", (qid, json.dumps({"rule": "window"}))
    )
    row = conn.execute(
        "SELECT kind, attempt, provider_id, detail FROM call_events WHERE id = %s", (held,)
    ).fetchone()
    assert row == ("held", 0, None, {"rule": "window"})
    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (qid, p))
    with as_role(conn, "callq_worker"):  # rolled back at the end of the block
        rid = one(conn, "SELECT record_call_event(%s, 'ringing')", (qid,))
        row = conn.execute(
            "SELECT kind, attempt, provider_id, assignment_id, detail FROM call_events"
            " WHERE id = %s",
            (rid,),
        ).fetchone()
    assert row == ("ringing", 1, p, aid, None)

    assert sqlstate(conn, "SELECT record_call_event(%s, 'held')", (uuid.uuid4(),)) == "CQ050"
    for bad in ("completed", "canceled", "nonsense", None):
        assert sqlstate(conn, "SELECT record_call_event(%s, %s)", (qid, bad)) == "CQ051"
    assert sqlstate(conn, "SELECT record_call_event(%s, 'held', '[1]')", (qid,)) == "CQ051"
    for role in ("anon", "authenticated"):
        with as_role(conn, role, setup[0]):
            assert sqlstate(conn, "SELECT record_call_event(%s, 'held')", (qid,)) == "42501"


def test_owner_reads_own_events_only(conn: Conn) -> None:
    a, b = make_user(conn, call_limit=None), make_user(conn, call_limit=None)
    qa = schedule(conn, a, make_template(conn, a))
    qb = schedule(conn, b, make_template(conn, b))
    ids = {u: {r[0] for r in conn.execute("SELECT id FROM call_events WHERE user_id = %s", (u,))}
           for u in (a, b)}  # fmt: skip
    for user, mine, other in ((a, qa, qb), (b, qb, qa)):
        with as_role(conn, "authenticated", user):
            seen = {r[0] for r in conn.execute("SELECT id FROM call_events")}
            assert seen == ids[user]
            assert (
                conn.execute("SELECT 1 FROM call_events WHERE queue_id = %s", (other,)).fetchall()
                == []
            )
            assert kinds(conn, mine) == ["scheduled"]
            for stmt in (
                "INSERT INTO call_events (queue_id, user_id, kind) VALUES (gen_random_uuid(),"
                " auth.uid(), 'held')",
                "UPDATE call_events SET kind = 'held'",
                "DELETE FROM call_events",
                "SELECT * FROM ops_answer_rate_hourly",
            ):
                assert sqlstate(conn, stmt) == "42501", stmt
    with as_role(conn, "anon"):
        assert sqlstate(conn, "SELECT id FROM call_events") == "42501"
    with as_role(conn, "service_role"):
        assert one(conn, "SELECT count(*) FROM call_events") == 2
        assert sqlstate(conn, "UPDATE call_events SET kind = kind") == "42501"  # append-only


def test_retention_and_user_deletion(conn: Conn, setup: Setup) -> None:
    for _ in range(3):
        schedule(conn, *setup)
    conn.execute(
        "UPDATE call_events SET created_at = now() - interval '100 days'"
        " WHERE id IN (SELECT id FROM call_events ORDER BY id LIMIT 2)"
    )
    with as_role(conn, "callq_worker"):
        assert one(conn, "SELECT prune_call_events(interval '90 days', 1)") == 1
        assert one(conn, "SELECT prune_call_events(interval '90 days', 100)") == 1
        assert one(conn, "SELECT prune_call_events()") == 0
        assert sqlstate(conn, "SELECT prune_call_events(interval '1 minute')") == "CQ052"
        assert one(conn, "SELECT count(*) FROM call_events") == 1
    # closing the account keeps the call history, events included (they hold no personal
    # data), and logs the cancel of each call not yet dialed
    conn.execute("DELETE FROM auth.users WHERE id = %s", (setup[0],))
    assert one(conn, "SELECT count(*) FROM call_events WHERE kind = 'scheduled'") == 3
    assert one(conn, "SELECT count(*) FROM call_events WHERE kind = 'canceled'") == 3


def test_ops_views(conn: Conn, setup: Setup) -> None:
    p1 = make_provider(conn, priority=1)
    p2 = make_provider(conn, priority=2)
    outcomes = {p1: ["completed", "completed", "completed", "busy"], p2: ["no_answer", "completed"]}
    for provider, results in outcomes.items():
        for result in results:
            qid = schedule(conn, *setup)
            conn.execute(
                "UPDATE call_queue SET scheduled_time = now() - interval '2 s' WHERE id = %s",
                (qid,),
            )
            aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (qid, provider))
            one(conn, "SELECT mark_call_dialing(%s)", (aid,))
            one(conn, "SELECT mark_call_placed(%s, 'x')", (aid,))
            if result == "completed":
                one(conn, "SELECT complete_call(%s, 10)", (aid,))
            else:
                one(conn, "SELECT handle_failed_call(%s, %s)", (aid, result))
    with as_role(conn, "callq_worker"):
        rates = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT provider_id, attempts_ended, answered, answer_rate::float"
                " FROM ops_answer_rate_hourly"
            )
        }
        assert rates == {p1: (4, 3, 0.75), p2: (2, 1, 0.5)}
        dialed, p50, p99, c50 = conn.execute(
            "SELECT dialed, dial_p50_s, dial_p99_s, create_p50_s FROM ops_dial_latency_hourly"
        ).fetchone()  # type: ignore[misc]
        assert dialed == 6
        assert 2 <= p50 <= p99 < 60 and c50 >= 2


def test_realtime_publication_hides_other_users_rows(conn: Conn) -> None:
    """What Supabase Realtime does for postgres_changes: a change on a published table is sent
    to a subscriber only if the row passes the subscriber's SELECT policies (Realtime selects it
    as role authenticated with the subscriber's JWT claims). Plain PostgreSQL has no Realtime
    server, so this checks the two halves: the publication holds both tables, and the same
    RLS-checked SELECT by primary key, as another user, returns nothing."""
    conn.execute("CREATE PUBLICATION supabase_realtime")
    conn.execute(
        "ALTER PUBLICATION supabase_realtime ADD TABLE public.call_queue, public.call_events"
    )
    published = {
        r[0]
        for r in conn.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = 'supabase_realtime'"
        )
    }
    assert published == {"call_queue", "call_events"}
    a, b = make_user(conn, call_limit=None), make_user(conn, call_limit=None)
    qa = schedule(conn, a, make_template(conn, a))
    event = one(conn, "SELECT id FROM call_events WHERE queue_id = %s", (qa,))
    for user, visible in ((a, 1), (b, 0)):
        with as_role(conn, "authenticated", user):
            assert (
                len(conn.execute("SELECT * FROM call_events WHERE id = %s", (event,)).fetchall())
                == visible
            )
            assert (
                len(conn.execute("SELECT * FROM call_queue WHERE id = %s", (qa,)).fetchall())
                == visible
            )


# --- property: the log is a faithful record of every transition ------------------------------

OPS = st.lists(
    st.sampled_from(["claim", "dial", "place", "complete", "busy", "provider_error", "release",
                     "reap", "cancel"]),
    min_size=1,
    max_size=25,
)  # fmt: skip


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_events_match_the_state_tables(conn: Conn, setup: Setup, ops: list[str]) -> None:
    # calls and providers of earlier examples (same database) take no part
    conn.execute("UPDATE call_service_providers SET is_active = false")
    conn.execute("UPDATE call_queue SET status = 'canceled' WHERE status = 'queued'")
    make_provider(conn, max_calls=3)
    make_provider(conn, max_calls=3, priority=2)
    qids = [schedule(conn, *setup) for _ in range(3)]
    for op in ops:
        conn.execute("UPDATE call_queue SET scheduled_time = now() WHERE status = 'queued'")
        live = conn.execute(
            "SELECT id, state FROM call_assignments WHERE queue_id = ANY(%s)"
            " AND state IN ('assigned', 'dialing', 'placed') ORDER BY id LIMIT 1",
            (qids,),
        ).fetchone()
        if op == "claim":
            conn.execute("SELECT * FROM claim_and_assign_calls(2, 'w', 60)").fetchall()
        elif op == "reap":
            conn.execute(
                "UPDATE call_queue SET lease_expires_at = now() - interval '1 s'"
                " WHERE id = ANY(%s) AND status IN ('claimed', 'assigned')",
                (qids,),
            )
            conn.execute("SELECT * FROM reap_expired_leases()").fetchall()
        elif op == "cancel":
            conn.execute("UPDATE call_queue SET status = 'canceled' WHERE id = %s"
                         " AND status = 'queued'", (qids[0],))  # fmt: skip
        elif live is None:
            continue
        elif op == "dial":
            conn.execute("SELECT mark_call_dialing(%s)", (live[0],))
        elif op == "place":
            conn.execute("SELECT mark_call_placed(%s, 'pc')", (live[0],))
        elif op == "complete":
            conn.execute("SELECT complete_call(%s, 5)", (live[0],))
        elif op == "release":
            conn.execute("SELECT release_assignment(%s, 'lease_expired')", (live[0],))
        else:
            conn.execute("SELECT handle_failed_call(%s, %s)", (live[0], op))
    for qid in qids:
        counts = dict(
            conn.execute(
                "SELECT kind, count(*) FROM call_events WHERE queue_id = %s GROUP BY 1", (qid,)
            ).fetchall()
        )
        facts = conn.execute(
            "SELECT count(*), count(dialing_at), count(placed_at),"
            " count(*) FILTER (WHERE state IN ('completed', 'failed', 'canceled')),"
            " count(*) FILTER (WHERE state = 'released') FROM call_assignments WHERE queue_id = %s",
            (qid,),
        ).fetchone()
        assert facts is not None
        got = tuple(
            counts.get(k, 0) for k in ("assigned", "dialing", "placed", "ended", "released")
        )
        assert got == facts
        assert counts["scheduled"] == 1
        status = one(conn, "SELECT status FROM call_queue WHERE id = %s", (qid,))
        last = one(
            conn,
            "SELECT kind FROM call_events WHERE queue_id = %s AND kind IN ('scheduled', 'claimed',"
            " 'requeued', 'retried', 'failed_over', 'completed', 'failed', 'canceled')"
            " ORDER BY id DESC LIMIT 1",
            (qid,),
        )
        if status in ("completed", "failed", "canceled", "claimed"):
            assert last == status
        elif status == "queued":
            assert last in ("scheduled", "requeued", "retried", "failed_over")
        retries = one(
            conn,
            "SELECT count(*) FROM call_retries WHERE queue_id = %s AND next_attempt_at IS NOT NULL",
            (qid,),
        )
        assert counts.get("retried", 0) + counts.get("failed_over", 0) == retries
