"""The hot tables' row checks (call_queue, call_assignments, call_history, call_events): one
CHECK per table through a function (supabase/migrations/20240101000100, call_queue_row_check).

Each rule refuses a row that breaks it with 23514 and a message naming the table and column,
never the value (a plain CHECK's error carried the whole row: phone number, name); the catalog
keeps one CHECK per hot table; and hypothesis holds the functions to a model of the rules."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .dbutil import Conn, make_provider, make_template, make_user, one, schedule

PHONE = "+15557654321"
NAME = "Ada Lovelace"

# (table, SET clause, the column its message names)
RULES = [
    ("call_queue", "recipient_name = ' '", "recipient_name"),
    ("call_queue", "recipient_name = repeat('x', 201)", "recipient_name"),
    ("call_queue", "recipient_phone = '555'", "recipient_phone"),
    ("call_queue", "recipient_email = 'not an address'", "recipient_email"),
    ("call_queue", "status = 'lost'", "status"),
    ("call_queue", "priority = 11", "priority"),
    ("call_queue", "priority = 0", "priority"),
    ("call_queue", "attempts = -1", "attempts"),
    ("call_queue", "max_attempts = 21", "max_attempts"),
    ("call_queue", "custom_variables = '[]'", "custom_variables"),
    ("call_queue", "metadata = '1'", "metadata"),
    ("call_queue", "idempotency_key = ''", "idempotency_key"),
    ("call_queue", "required_capabilities = '[]'", "required_capabilities"),
    ("call_queue", "recipient_timezones = '{}'", "recipient_timezones"),
    ("call_queue", "recipient_phone = NULL", "recipient_name, recipient_phone"),
    ("call_queue", "counter_stripe = 16", None),  # the plans' own CHECK (20240101000120)
    ("call_assignments", "state = 'lost'", "state"),
    ("call_assignments", "attempt = 0", "attempt"),
    ("call_assignments", "poll_count = -1", "poll_count"),
    ("call_assignments", "reserved_minutes = -1", "reserved_minutes"),
    ("call_assignments", "max_duration_seconds = 0", "max_duration_seconds"),
    ("call_history", "recipient_phone = '555'", "recipient_phone"),
    ("call_history", "status = 'lost'", "status"),
    ("call_history", "duration_seconds = -1", "duration_seconds"),
    ("call_history", "cost = -0.01", "cost"),
    ("call_history", "attempts = -1", "attempts"),
    ("call_history", "ended_at = started_at - interval '1 second'", "ended_at"),
    ("call_events", "kind = 'lost'", "kind"),
    ("call_events", "detail = '[1]'", "detail"),
]


@pytest.fixture
def rows(conn: Conn) -> dict[str, Any]:
    """One valid row of each hot table, about one call to PHONE / NAME."""
    user = make_user(conn, call_limit=None)
    template = make_template(conn, user)
    provider = make_provider(conn, max_calls=5)
    queue_id = schedule(conn, user, template, recipient_phone=PHONE, recipient_name=NAME)
    assignment = one(conn, "SELECT assignment_id FROM claim_and_assign_calls(1, 'test', 60)")
    history = one(
        conn,
        "INSERT INTO call_history (user_id, queue_id, provider_id, recipient_name,"
        " recipient_phone, status, started_at, ended_at, duration_seconds, cost, attempts)"
        " VALUES (%s, %s, %s, %s, %s, 'completed', now() - interval '1 minute', now(), 60, 0.1, 1)"
        " RETURNING id",
        (user, queue_id, provider, NAME, PHONE),
    )
    event = one(
        conn, "SELECT id FROM call_events WHERE queue_id = %s ORDER BY id LIMIT 1", (queue_id,)
    )
    return {
        "call_queue": queue_id,
        "call_assignments": assignment,
        "call_history": history,
        "call_events": event,
    }


def _snapshot(conn: Conn, table: str, key: Any) -> Any:
    return one(conn, f"SELECT to_jsonb(t) FROM {table} t WHERE id = %s", (key,))  # type: ignore[arg-type]


@pytest.mark.parametrize(("table", "change", "column"), RULES)
def test_each_rule_refuses_by_name_never_by_value(
    conn: Conn, rows: dict[str, Any], table: str, change: str, column: str | None
) -> None:
    before = _snapshot(conn, table, rows[table])
    with pytest.raises(psycopg.Error) as info, conn.transaction():
        conn.execute(f"UPDATE {table} SET {change} WHERE id = %s", (rows[table],))  # type: ignore[arg-type]
    err = info.value
    assert err.sqlstate == "23514"
    if column is not None:
        assert str(err.diag.message_primary).startswith(f"{table}.{column}: ")
        # no value of the row: neither in the message nor in a detail
        assert err.diag.message_detail is None
        assert PHONE not in str(err) and NAME not in str(err)
    assert _snapshot(conn, table, rows[table]) == before


def test_valid_rows_pass_and_null_rules_hold(conn: Conn, rows: dict[str, Any]) -> None:
    """A rule that is NULL holds, as in a CHECK: optional columns may be NULL."""
    updates = [
        ("call_queue", "recipient_email = NULL, idempotency_key = NULL,"
                       " required_capabilities = NULL"),
        ("call_assignments", "max_duration_seconds = NULL"),
        ("call_history", "recipient_phone = NULL, duration_seconds = NULL, cost = NULL,"
                         " started_at = NULL"),
        ("call_events", "detail = NULL"),
        ("call_events", "detail = '{\"reason\": \"x\"}'"),
    ]  # fmt: skip
    for table, change in updates:
        n = conn.execute(f"UPDATE {table} SET {change} WHERE id = %s", (rows[table],)).rowcount  # type: ignore[arg-type]
        assert n == 1
    # a finished call of a closed account keeps no name or number
    conn.execute(
        "UPDATE call_queue SET status = 'canceled', recipient_name = NULL, recipient_phone = NULL"
        " WHERE id = %s",
        (rows["call_queue"],),
    )


HOT = ("call_queue", "call_assignments", "call_history", "call_events")


def test_each_hot_table_has_one_row_check(conn: Conn) -> None:
    """A column CHECK on a hot table is read back from its text at every statement that writes
    the table: rules go into the table's row check function instead."""
    checks = conn.execute(
        "SELECT conrelid::regclass::text, array_agg(conname::text ORDER BY conname)"
        " FROM pg_constraint WHERE contype = 'c' AND conrelid = ANY (%s::regclass[])"
        " GROUP BY 1 ORDER BY 1",
        ([f"public.{t}" for t in HOT],),
    ).fetchall()
    assert dict(checks) == {
        "call_assignments": ["call_assignments_row_check"],
        "call_events": ["call_events_row_check"],
        "call_history": ["call_history_row_check"],
        "call_queue": ["call_queue_counter_stripe_check", "call_queue_row_check"],
    }


def _queue_rules_hold(name: str | None, phone: str | None, priority: int, attempts: int,
                      max_attempts: int, status: str) -> bool:  # fmt: skip
    """The model: call_queue's documented rules (supabase/README.md) for these columns."""
    ok = True
    if name is not None:
        ok &= 1 <= len(name.strip(" ")) <= 200
    if phone is not None:
        ok &= re.fullmatch(r"\+[1-9][0-9]{6,14}", phone) is not None
    ok &= 1 <= priority <= 10 and attempts >= 0 and 1 <= max_attempts <= 20
    ok &= status in ("completed", "failed", "canceled") or (name is not None and phone is not None)
    return ok


@given(
    name=st.none() | st.text(alphabet="ab ", max_size=3) | st.just("x" * 201),
    phone=st.none() | st.from_regex(r"\+?[0-9]{5,16}", fullmatch=True),
    priority=st.integers(-1, 12),
    attempts=st.integers(-2, 3),
    max_attempts=st.integers(0, 22),
    status=st.sampled_from(["queued", "in_progress", "completed", "canceled"]),
)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_call_queue_row_check_follows_the_model(
    conn: Conn, name: str | None, phone: str | None, priority: int, attempts: int,
    max_attempts: int, status: str,
) -> None:  # fmt: skip
    try:
        with conn.transaction():
            ok = one(
                conn,
                "SELECT call_queue_row_check(%s, %s, NULL, %s, %s, %s, %s, '{}', '{}', NULL,"
                " NULL, '{UTC}')",
                (name, phone, status, priority, attempts, max_attempts),
            )
    except psycopg.errors.CheckViolation as exc:
        assert not _queue_rules_hold(name, phone, priority, attempts, max_attempts, status), exc
        assert exc.diag.message_detail is None
        return
    assert ok is True
    assert _queue_rules_hold(name, phone, priority, attempts, max_attempts, status)
