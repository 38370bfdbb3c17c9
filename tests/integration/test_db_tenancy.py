"""Tenancy and secrets (issue 8), database half: provider secrets and who writes providers,
cancel_call, template snapshots, references to other tenants' rows, closing an account.

Each test fails on the schema before issue 8 (see the test's docstring for what it used to do).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from models.queries import LOAD_CALLS

from .dbutil import (
    Conn,
    as_role,
    attempt,
    connect,
    make_provider,
    make_template,
    make_user,
    one,
    schedule,
    slots,
)


def sqlstate(conn: Conn, query: str, params: Any = None) -> str | None:
    """The SQLSTATE a statement fails with (None when it succeeds); always rolled back."""
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(query, params)  # type: ignore[arg-type]
    except psycopg.Error as exc:
        return str(exc.sqlstate)
    return None


def error(conn: Conn, query: str, params: Any = None) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info, conn.transaction():
        conn.execute(query, params)  # type: ignore[arg-type]
    return info.value


def queue_row(conn: Conn, qid: uuid.UUID) -> dict[str, Any]:
    row = conn.execute("SELECT to_jsonb(q) FROM call_queue q WHERE id = %s", (qid,)).fetchone()
    assert row is not None
    return dict(row[0])


# --- 1 and 2: provider secrets ----------------------------------------------------------------


def test_webhook_secret_is_a_credential_column(conn: Conn) -> None:
    """Before: the webhook secret lived in config, readable by admins and in the public view."""
    admin = make_user(conn, admin=True)
    provider = make_provider(conn)
    conn.execute(
        "UPDATE call_service_providers SET webhook_secret = 'whsec-x' WHERE id = %s", (provider,)
    )
    with as_role(conn, "authenticated", admin):
        assert attempt(conn, "SELECT webhook_secret FROM call_service_providers") == "42501"
        view = [
            r[0] for r in conn.execute("SELECT to_jsonb(v) FROM call_service_providers_public v")
        ]
        assert view and "whsec-x" not in json.dumps(view)
        assert not {"api_key", "api_secret", "webhook_secret"} & set(view[0])
    for role in ("service_role", "callq_worker"):
        with as_role(conn, role):
            assert one(conn, "SELECT webhook_secret FROM call_service_providers") == "whsec-x"


@pytest.mark.parametrize(
    "config",
    [
        {"webhook_secret": "x"},
        {"api_key": "x"},
        {"apiKey": "x"},
        {"auth_token": "x"},
        {"model": {"accessToken": "x"}},
        {"servers": [{"password": "x"}]},
        {"Client-Secret": "x"},
        {"private_key": "x"},
    ],
)
def test_config_refuses_credentials(conn: Conn, config: dict[str, Any]) -> None:
    """Before: config accepted any key, so secrets sat where admins could read them."""
    provider = make_provider(conn)
    exc = error(
        conn,
        "UPDATE call_service_providers SET config = %s WHERE id = %s",
        (json.dumps(config), provider),
    )
    assert exc.sqlstate == "CQ014"
    assert "secret_in_config" in str(exc) and '"x"' not in str(exc)
    assert exc.diag.message_detail is None  # no "Failing row contains (...)"


def test_config_keeps_settings_that_only_look_alike(conn: Conn) -> None:
    provider = make_provider(conn)
    config = {
        "phone_number_id": "pn",
        "model": {"provider": "openai", "maxTokens": 250, "max_tokens": 250},
        "tokenizer": "x",
        "creates_per_second": 1,
    }
    conn.execute(
        "UPDATE call_service_providers SET config = %s WHERE id = %s",
        (json.dumps(config), provider),
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2@api.vapi.ai",
        "https://api.vapi.ai/?api_key=hunter2",
        "http://x/v1?a=1&token=hunter2",
    ],
)
def test_base_url_carries_no_credentials(conn: Conn, url: str) -> None:
    provider = make_provider(conn)
    exc = error(
        conn, "UPDATE call_service_providers SET base_url = %s WHERE id = %s", (url, provider)
    )
    assert exc.sqlstate == "CQ014" and "hunter2" not in str(exc)


def test_admin_cannot_redirect_a_provider_or_swap_its_key(conn: Conn) -> None:
    """Before: an admin could set base_url (the worker then sent the key there) or write
    api_key = 'env:DATABASE_URL'."""
    admin = make_user(conn, admin=True)
    provider = make_provider(conn)
    with as_role(conn, "authenticated", admin):
        for statement in (
            "UPDATE call_service_providers SET base_url = 'https://evil.example'",
            "UPDATE call_service_providers SET api_key = 'env:DATABASE_URL'",
            'UPDATE call_service_providers SET config = \'{"read_timeout": "env:X"}\'',
            "UPDATE call_service_providers SET provider_type = 'synthflow'",
            "UPDATE call_service_providers SET webhook_secret = 'mine'",
            "DELETE FROM call_service_providers",
        ):
            assert attempt(conn, statement) == "42501", statement
        assert attempt(conn, "UPDATE call_service_providers SET is_active = false") == 1
    assert one(conn, "SELECT base_url FROM call_service_providers WHERE id = %s", (provider,)) == (
        "https://api.example.com"
    )


def test_worker_reads_the_webhook_secret_column(db_url: str) -> None:
    from models.queries import Database
    from worker.runtime import provider_config

    with connect(db_url) as conn:
        provider = make_provider(conn)
        conn.execute(
            "UPDATE call_service_providers SET webhook_secret = 'whsec-col' WHERE id = %s",
            (provider,),
        )
    db = Database(db_url, max_size=1)
    try:
        (row,) = [r for r in db.active_providers() if r.provider_id == provider]
    finally:
        db.close()
    secret = provider_config(row).webhook_secret
    assert secret is not None and secret.get_secret_value() == "whsec-col"


# --- 3: cancel_call -----------------------------------------------------------------------------


@pytest.fixture
def two(conn: Conn) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID, uuid.UUID]:
    """Users A and B, a private template each."""
    a, b = make_user(conn), make_user(conn)
    return a, b, make_template(conn, a), make_template(conn, b)


def test_cancel_call_changes_only_the_status(conn: Conn, two: Any) -> None:
    """Before: the cancel policy let a user change any column while setting status canceled
    (e.g. template_id to another user's private template)."""
    a, _b, ta, tb = two
    qid = schedule(conn, a, ta)
    before = queue_row(conn, qid)
    with as_role(conn, "authenticated", a):
        conn.execute("SELECT cancel_call(%s)", (qid,))
        after = queue_row(conn, qid)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {"status", "last_error", "completed_at", "updated_at"}
    assert after["status"] == "canceled" and after["last_error"] == "canceled_by_user"
    with as_role(conn, "authenticated", a):
        assert (
            attempt(conn, "UPDATE call_queue SET status = 'canceled', template_id = %s", (tb,))
            == "42501"
        )


def test_cancel_call_refuses_other_users_and_unknown_ids_alike(conn: Conn, two: Any) -> None:
    a, b, _ta, tb = two
    theirs = schedule(conn, b, tb)
    with as_role(conn, "authenticated", a):
        errors = [error(conn, "SELECT cancel_call(%s)", (q,)) for q in (theirs, uuid.uuid4())]
    assert {e.sqlstate for e in errors} == {"CQ015"}
    assert len({str(e) for e in errors}) == 1  # same text: existence is not revealed
    assert queue_row(conn, theirs)["status"] == "queued"
    with as_role(conn, "anon"):
        assert attempt(conn, "SELECT cancel_call(%s)", (theirs,)) == "42501"


def test_cancel_call_by_state(conn: Conn, two: Any) -> None:
    a, _b, ta, _tb = two
    provider = make_provider(conn, max_calls=5)
    claimed = schedule(conn, a, ta)
    conn.execute("SELECT claim_due_calls(1, 'w')")
    assert queue_row(conn, claimed)["status"] == "claimed"
    assigned = schedule(conn, a, ta)
    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (assigned, provider))
    dialing = schedule(conn, a, ta)
    did = one(conn, "SELECT assign_call_to_provider(%s, %s)", (dialing, provider))
    assert one(conn, "SELECT mark_call_dialing(%s)", (did,)) is True
    placed = schedule(conn, a, ta)
    pid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (placed, provider))
    one(conn, "SELECT mark_call_dialing(%s)", (pid,))
    one(conn, "SELECT mark_call_placed(%s, 'pc-1')", (pid,))
    done = schedule(conn, a, ta)
    conn.execute("SELECT cancel_call(%s)", (done,))  # service role: any call
    assert slots(conn, provider) == (3, 2)

    def cancel(qid: uuid.UUID) -> str | None:
        with as_role(conn, "authenticated", a):
            try:
                conn.execute("SELECT cancel_call(%s)", (qid,))
            except psycopg.Error as exc:
                return str(exc.sqlstate)
            # as_role rolls back: cancel again outside to keep the effect
        conn.execute("SELECT cancel_call(%s)", (qid,))
        return None

    assert cancel(claimed) is None
    assert cancel(assigned) is None
    assert cancel(dialing) == "CQ017"
    assert cancel(placed) == "CQ017"
    assert cancel(done) == "CQ016"
    assert queue_row(conn, claimed)["status"] == "canceled"
    assert queue_row(conn, assigned)["status"] == "canceled"
    # the assigned call's slot is back and the dial gate refuses it
    assert one(conn, "SELECT state FROM call_assignments WHERE id = %s", (aid,)) == "canceled"
    assert one(conn, "SELECT mark_call_dialing(%s)", (aid,)) is False
    assert slots(conn, provider) == (2, 3)
    assert queue_row(conn, dialing)["status"] == "dialing"
    assert queue_row(conn, placed)["status"] == "in_progress"


# --- 3: templates and references to other tenants' rows ---------------------------------------


def test_a_queued_call_keeps_its_template_snapshot(conn: Conn, two: Any) -> None:
    """Before: A's queued call on B's public template blocked B from deleting it (and B's edits
    changed what A's call would say)."""
    a, b, _ta, _tb = two
    public = make_template(conn, b, public=True)
    provider = make_provider(conn)
    qid = schedule(conn, a, public)
    with as_role(conn, "authenticated", b):
        conn.execute("UPDATE call_templates SET script = 'changed' WHERE id = %s", (public,))
        assert attempt(conn, "DELETE FROM call_templates WHERE id = %s", (public,)) == 1
    conn.execute("DELETE FROM call_templates WHERE id = %s", (public,))
    row = queue_row(conn, qid)
    assert row["template_id"] is None and row["status"] == "queued"
    snapshot = row["template_snapshot"]
    assert (snapshot["name"], snapshot["script"]) == ("Reminder", "Hello {{name}}")
    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (qid, provider))
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        loaded = cur.execute(LOAD_CALLS, {"assignment_ids": [str(aid)]}).fetchone()
    assert loaded is not None
    assert (loaded["template_name"], loaded["script"]) == ("Reminder", "Hello {{name}}")


def test_no_write_reveals_or_references_another_users_private_row(conn: Conn, two: Any) -> None:
    """Foreign keys ignore RLS: each user-writable reference answers the same for another
    user's private row as for an id that does not exist, and never succeeds."""
    a, b, ta, tb = two
    provider = make_provider(conn)
    bq = schedule(conn, b, tb)
    bid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (bq, provider))
    one(conn, "SELECT mark_call_dialing(%s)", (bid,))
    b_history = one(conn, "SELECT complete_call(%s, 10)", (bid,))
    aq = schedule(conn, a, ta)
    aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (aq, provider))
    one(conn, "SELECT mark_call_dialing(%s)", (aid,))
    a_history = one(conn, "SELECT complete_call(%s, 10)", (aid,))
    conn.execute("INSERT INTO call_feedback (call_id, user_id, rating) VALUES (%s, %s, 3)",
                 (a_history, a))  # fmt: skip
    probes = [
        ("INSERT INTO template_favorites (user_id, template_id) VALUES (%(a)s, %(x)s)", tb),
        ("INSERT INTO call_feedback (call_id, user_id, rating) VALUES (%(x)s, %(a)s, 4)",
         b_history),
        ("UPDATE call_feedback SET call_id = %(x)s", b_history),
        ("INSERT INTO call_templates (id, created_by, name, script) VALUES (%(x)s, %(a)s, 'n',"
         " 's')", tb),
        ("UPDATE call_queue SET template_id = %(x)s", tb),
        ("SELECT schedule_call(%(a)s, %(x)s, 'R', '+15551234567')", tb),
        ("SELECT cancel_call(%(x)s)", bq),
    ]  # fmt: skip
    with as_role(conn, "authenticated", a):
        for statement, private in probes:
            hidden = sqlstate(conn, statement, {"a": a, "x": private})
            missing = sqlstate(conn, statement, {"a": a, "x": uuid.uuid4()})
            assert hidden == missing, statement
            assert hidden is not None or attempt(conn, statement, {"a": a, "x": private}) == 0


# --- 4: closing an account ----------------------------------------------------------------------


def test_closing_an_account_keeps_billing_and_lets_calls_finish(conn: Conn, two: Any) -> None:
    """Before: DELETE FROM users cascaded through usage, subscriptions, history and live
    assignments: those calls were never billed and their slots stayed held."""
    a, b, ta, _tb = two
    public = make_template(conn, a, public=True)
    provider = make_provider(conn, max_calls=5)
    finished = schedule(conn, a, ta, recipient_email="a@example.com")
    fid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (finished, provider))
    one(conn, "SELECT mark_call_dialing(%s)", (fid,))
    one(conn, "SELECT complete_call(%s, 61, 'https://rec/1', 'hello there')", (fid,))
    queued = schedule(conn, a, ta)
    assigned = schedule(conn, a, ta)
    one(conn, "SELECT assign_call_to_provider(%s, %s)", (assigned, provider))
    flying = schedule(conn, a, ta)
    lid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (flying, provider))
    one(conn, "SELECT mark_call_dialing(%s)", (lid,))
    one(conn, "SELECT mark_call_placed(%s, 'pc-live')", (lid,))
    theirs = schedule(conn, b, public)  # B's call on A's public template
    conn.execute("INSERT INTO template_favorites (user_id, template_id) VALUES (%s, %s)",
                 (b, public))  # fmt: skip
    usage_before = conn.execute(
        "SELECT calls_made, minutes_used FROM user_call_usage WHERE user_id = %s", (a,)
    ).fetchone()
    # the billing model counts every dial at the gate: the finished call and the live one
    assert usage_before == (2, 2) and slots(conn, provider) == (2, 3)

    with as_role(conn, "authenticated", a):
        assert attempt(conn, "DELETE FROM users WHERE id = %s", (a,)) == "42501"
    with conn.transaction():  # as_role always rolls back: run the real one in its own tx
        conn.execute("SET LOCAL ROLE authenticated")
        conn.execute(
            "SELECT set_config('request.jwt.claims', %s, true)",
            (json.dumps({"role": "authenticated", "sub": str(a)}),),
        )
        conn.execute("SELECT delete_my_account()")

    assert one(conn, "SELECT count(*) FROM auth.users WHERE id = %s", (a,)) == 0
    profile = conn.execute(
        "SELECT email, full_name, is_admin, deleted_at IS NOT NULL FROM users WHERE id = %s", (a,)
    ).fetchone()
    assert profile == (None, None, False, True)
    status = {q: queue_row(conn, q)["status"] for q in (finished, queued, assigned, flying)}
    assert status == {finished: "completed", queued: "canceled", assigned: "canceled",
                      flying: "in_progress"}  # fmt: skip
    assert slots(conn, provider) == (1, 4)  # the assigned call's slot is back, the live one held
    history = conn.execute(
        "SELECT recipient_name, recipient_phone, recipient_email, transcript, recording_url,"
        " duration_seconds FROM call_history WHERE user_id = %s",
        (a,),
    ).fetchall()
    assert history == [(None, None, None, None, None, 61)]
    assert one(conn, "SELECT status FROM user_subscriptions WHERE user_id = %s", (a,)) == (
        "canceled"
    )
    assert one(conn, "SELECT count(*) FROM call_templates WHERE created_by = %s", (a,)) == 0
    # B's call goes on with its snapshot
    row = queue_row(conn, theirs)
    assert (row["status"], row["template_id"]) == ("queued", None)
    assert row["template_snapshot"]["script"] == "Hello {{name}}"

    # the call in flight finishes normally: billed, slot given back, anonymised
    one(conn, "SELECT complete_call(%s, 30, 'https://rec/2', 'bye')", (lid,))
    assert slots(conn, provider) == (0, 5)
    assert conn.execute(
        "SELECT calls_made, minutes_used FROM user_call_usage WHERE user_id = %s", (a,)
    ).fetchone() == (2, 3)
    live = queue_row(conn, flying)
    assert live["status"] == "completed" and live["recipient_phone"] is None
    assert (
        one(
            conn,
            "SELECT count(*) FROM call_history WHERE user_id = %s AND recipient_phone IS NULL"
            " AND transcript IS NULL",
            (a,),
        )
        == 2
    )
    assert "+1555" not in json.dumps([queue_row(conn, q) for q in (finished, queued, flying)])

    # a token that outlives the account writes nothing
    with as_role(conn, "authenticated", a):
        assert attempt(conn, "SELECT schedule_call(%s, %s, 'R', '+15551234567')",
                       (a, public)) == "CQ001"  # fmt: skip
        assert attempt(conn, "INSERT INTO call_templates (created_by, name, script)"
                       " VALUES (%s, 'n', 's')", (a,)) == "42501"  # fmt: skip
        assert attempt(conn, "UPDATE users SET full_name = 'back'") == 0


def test_deleting_the_auth_user_closes_the_account(conn: Conn, two: Any) -> None:
    """DELETE FROM auth.users (Supabase dashboard, admin API) takes the same path."""
    a, _b, ta, _tb = two
    queued = schedule(conn, a, ta)
    conn.execute("DELETE FROM auth.users WHERE id = %s", (a,))
    assert queue_row(conn, queued)["status"] == "canceled"
    assert queue_row(conn, queued)["recipient_name"] is None
    assert one(conn, "SELECT count(*) FROM user_subscriptions WHERE user_id = %s", (a,)) == 1
    # a profile with billing records or calls is never deleted outright
    assert sqlstate(conn, "DELETE FROM users WHERE id = %s", (a,)) == "23503"
