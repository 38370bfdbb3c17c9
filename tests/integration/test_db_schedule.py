"""schedule_call: validation (each SQLSTATE, nothing inserted), defaults, idempotency, notify,
and acting only for auth.uid() as role authenticated."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from .dbutil import Conn, as_role, connect, make_template, make_user, one, schedule


def _queue_count(conn: Conn) -> int:
    return int(one(conn, "SELECT count(*) FROM call_queue"))


def test_schedules_a_due_call_with_defaults(conn: Conn) -> None:
    user = make_user(conn)
    tpl = make_template(conn, user)
    before = one(conn, "SELECT now()")
    qid = schedule(conn, user, tpl, scheduled_time=datetime.now(UTC) - timedelta(days=1))
    row = conn.execute(
        "SELECT status, priority, scheduled_time, attempts, max_attempts, custom_variables,"
        " metadata, excluded_provider_ids FROM call_queue WHERE id = %s",
        (qid,),
    ).fetchone()
    assert row is not None
    status, priority, when, attempts, max_attempts, variables, metadata, excluded = row
    assert (status, priority, attempts, max_attempts) == ("queued", 5, 0, 3)
    assert when >= before  # a past time means now
    assert variables == {} and metadata == {} and excluded == []


def test_future_call_keeps_its_time_and_arguments(conn: Conn) -> None:
    user = make_user(conn)
    tpl = make_template(conn, user)
    when = datetime.now(UTC) + timedelta(hours=1)
    qid = schedule(
        conn,
        user,
        tpl,
        recipient_email="john@example.com",
        scheduled_time=when,
        priority=3,
        custom_variables='{"company_name": "Acme Inc"}',
        metadata='{"source": "web_app"}',
    )
    row = conn.execute(
        "SELECT scheduled_time, priority, custom_variables, metadata, recipient_email"
        " FROM call_queue WHERE id = %s",
        (qid,),
    ).fetchone()
    assert row == (when, 3, {"company_name": "Acme Inc"}, {"source": "web_app"}, "john@example.com")


def test_public_template_of_another_user_is_allowed(conn: Conn) -> None:
    owner = make_user(conn)
    user = make_user(conn)
    assert schedule(conn, user, make_template(conn, owner, public=True))


def test_idempotency_key_returns_first_call(conn: Conn) -> None:
    user = make_user(conn, call_limit=1)
    tpl = make_template(conn, user)
    first = schedule(conn, user, tpl, idempotency_key="req-1")
    # the retry returns the same id even though the plan's single call is now pending
    assert schedule(conn, user, tpl, idempotency_key="req-1") == first
    assert _queue_count(conn) == 1
    other = make_user(conn)
    assert schedule(conn, other, make_template(conn, other), idempotency_key="req-1") != first


def test_notifies_only_when_due_now(conn: Conn, db_url: str) -> None:
    user = make_user(conn)
    tpl = make_template(conn, user)
    with connect(db_url) as listener:
        listener.execute("LISTEN callq_queue")
        schedule(conn, user, tpl, scheduled_time=datetime.now(UTC) + timedelta(hours=1))
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []
        schedule(conn, user, tpl)
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert [(n.channel, n.payload) for n in got] == [("callq_queue", "")]


ERROR_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("CQ001", "user_not_found", {"user": "missing"}),
    ("CQ002", "no_active_subscription", {"user": "unsubscribed"}),
    ("CQ003", "call_limit_reached", {"user": "at_limit"}),
    ("CQ004", "template_not_found", {"template": "missing"}),
    ("CQ004", "template_not_found", {"template": "private_of_other"}),
    ("CQ005", "invalid_phone", {"recipient_phone": "5551234567"}),
    ("CQ005", "invalid_phone", {"recipient_phone": "+0551234567"}),
    ("CQ005", "invalid_phone", {"recipient_phone": "+1555"}),
    ("CQ006", "invalid_priority", {"priority": 0}),
    ("CQ006", "invalid_priority", {"priority": 11}),
    ("CQ007", "invalid_custom_variables", {"custom_variables": "[1, 2]"}),
    ("CQ007", "invalid_custom_variables", {"custom_variables": '"text"'}),
    ("CQ009", "invalid_recipient", {"recipient_name": "   "}),
    ("CQ009", "invalid_recipient", {"recipient_name": "x" * 201}),
    ("CQ009", "invalid_recipient", {"recipient_email": "not-an-email"}),
    ("CQ010", "invalid_metadata", {"metadata": "[]"}),
]


@pytest.mark.parametrize(("code", "word", "case"), ERROR_CASES)
def test_each_violation_raises_its_sqlstate_and_inserts_nothing(
    conn: Conn, code: str, word: str, case: dict[str, Any]
) -> None:
    user = make_user(conn, call_limit=2)
    tpl = make_template(conn, user)
    kw = dict(case)
    who = kw.pop("user", None)
    which = kw.pop("template", None)
    if who == "missing":
        user = uuid.uuid4()
    elif who == "unsubscribed":
        user = make_user(conn, subscribed=False)
        tpl = make_template(conn, user)
    elif who == "at_limit":
        schedule(conn, user, tpl)
        conn.execute(
            "INSERT INTO user_call_usage (user_id, period_start, period_end, calls_made)"
            " SELECT user_id, current_period_start, current_period_end, 1"
            " FROM user_subscriptions WHERE user_id = %s",
            (user,),
        )
    if which == "missing":
        tpl = uuid.uuid4()
    elif which == "private_of_other":
        tpl = make_template(conn, make_user(conn))
    before = _queue_count(conn)
    with pytest.raises(psycopg.Error) as err:
        schedule(conn, user, tpl, **kw)
    assert err.value.sqlstate == code
    assert str(err.value.diag.message_primary).startswith(word + ":")
    assert _queue_count(conn) == before


def test_limit_counts_used_and_pending_calls(conn: Conn) -> None:
    user = make_user(conn, call_limit=2)
    tpl = make_template(conn, user)
    schedule(conn, user, tpl)
    schedule(conn, user, tpl)
    with pytest.raises(psycopg.Error) as err:
        schedule(conn, user, tpl)
    assert err.value.sqlstate == "CQ003"
    # canceling one pending call frees an allowance
    conn.execute(
        "UPDATE call_queue SET status = 'canceled' WHERE id = (SELECT id FROM call_queue LIMIT 1)"
    )
    assert schedule(conn, user, tpl)


def test_unlimited_plan_has_no_limit(conn: Conn) -> None:
    user = make_user(conn, call_limit=None)
    tpl = make_template(conn, user)
    for _ in range(5):
        schedule(conn, user, tpl)
    assert _queue_count(conn) == 5


def test_authenticated_user_schedules_only_for_self(conn: Conn) -> None:
    alice = make_user(conn)
    bob = make_user(conn)
    tpl = make_template(conn, alice, public=True)
    with as_role(conn, "authenticated", alice):
        qid = schedule(conn, alice, tpl)
        assert one(conn, "SELECT count(*) FROM call_queue WHERE id = %s", (qid,)) == 1
    with as_role(conn, "authenticated", alice):
        with pytest.raises(psycopg.Error) as err:
            schedule(conn, bob, tpl)
        assert err.value.sqlstate == "CQ008"
    # no claims at all: refused too, and it does not reveal whether the user exists
    with as_role(conn, "authenticated"):
        with pytest.raises(psycopg.Error) as err:
            schedule(conn, uuid.uuid4(), tpl)
        assert err.value.sqlstate == "CQ008"
    with as_role(conn, "service_role"):
        assert schedule(conn, bob, tpl)


def test_anon_cannot_execute(conn: Conn) -> None:
    user = make_user(conn)
    tpl = make_template(conn, user, public=True)
    with as_role(conn, "anon", user), pytest.raises(psycopg.errors.InsufficientPrivilege):
        schedule(conn, user, tpl)
