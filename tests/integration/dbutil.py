"""Helpers for the database tests: connections, fixtures rows, running as an API role."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

Conn = psycopg.Connection[tuple[Any, ...]]


# The tables (the 13 of the system description, then later ones), listed independently of
# models/ so a test can catch a model or a migration that is missing one.
TABLES = [
    "users",
    "subscription_plans",
    "user_subscriptions",
    "user_call_usage",
    "call_templates",
    "call_history",
    "template_favorites",
    "call_feedback",
    "call_service_providers",
    "call_queue",
    "provider_availability",
    "call_assignments",
    "call_retries",
    "call_events",
    "ops_settings",
    "call_campaigns",
    "notification_endpoints",
    "call_notifications",
]
# Tables the issues added beyond the description's 13 (each helper appends its own).
DOMAIN_TABLES = [
    "tenant_call_counters",  # plans (issue 9)
    "provider_create_pacing",  # plans (issue 9)
    "provider_slots",  # slots as rows (issue 12)
    "user_call_usage_deltas",  # endings billed off the period's row (issue 12)
    "provider_call_tallies",  # endings counted off the provider's row (issue 12)
]
# The calling rules' tables: settings, reference data and rule rows (no SQLAlchemy models: only
# the SQL functions use them).
RULES_TABLES = [
    "calling_settings",
    "calling_timezones",
    "phone_prefix_zones",
    "calling_windows",
    "do_not_call",
    "call_consents",
    "contact_attempts",
]


def connect(url: str) -> Conn:
    return psycopg.connect(url, autocommit=True)


def one(conn: Conn, query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def attempt(conn: Conn, query: str, params: Any = None) -> int | str:
    """Row count, or the SQLSTATE of the error (rolled back to a savepoint)."""
    try:
        with conn.transaction():
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.rowcount
    except psycopg.Error as exc:
        return str(exc.sqlstate)


def make_plan(
    conn: Conn,
    call_limit: int | None = 100,
    name: str | None = None,
    *,
    minute_limit: int | None = 1000,
    max_concurrent: int = 100,
) -> uuid.UUID:
    return one(
        conn,
        "INSERT INTO subscription_plans (name, price, call_limit, minute_limit,"
        " max_concurrent_calls) VALUES (%s, 10, %s, %s, %s) RETURNING id",
        (name or f"plan-{uuid.uuid4().hex[:8]}", call_limit, minute_limit, max_concurrent),
    )


def make_user(
    conn: Conn,
    *,
    admin: bool = False,
    subscribed: bool = True,
    call_limit: int | None = 100,
    minute_limit: int | None = 1000,
    max_concurrent: int = 100,
) -> uuid.UUID:
    """An auth user (the trigger creates the profile), optionally with a live subscription."""
    uid = uuid.uuid4()
    conn.execute(
        "INSERT INTO auth.users (id, email, raw_user_meta_data) VALUES (%s, %s, %s)",
        (uid, f"{uid.hex[:8]}@example.com", json.dumps({"full_name": "Test User"})),
    )
    if admin:
        conn.execute("UPDATE users SET is_admin = true WHERE id = %s", (uid,))
    if subscribed:
        plan = make_plan(conn, call_limit, minute_limit=minute_limit, max_concurrent=max_concurrent)
        conn.execute(
            "INSERT INTO user_subscriptions (user_id, plan_id) VALUES (%s, %s)", (uid, plan)
        )
    return uid


def make_template(conn: Conn, owner: uuid.UUID | None, *, public: bool = False) -> uuid.UUID:
    return one(
        conn,
        "INSERT INTO call_templates (created_by, name, script, is_public, variables)"
        " VALUES (%s, 'Reminder', 'Hello {{name}}', %s, '[\"name\"]') RETURNING id",
        (owner, public),
    )


def make_provider(
    conn: Conn,
    *,
    max_calls: int = 10,
    priority: int = 1,
    capabilities: dict[str, Any] | None = None,
    active: bool = True,
    availability: bool = True,
) -> uuid.UUID:
    pid = one(
        conn,
        "INSERT INTO call_service_providers (name, provider_type, api_key, api_secret, base_url,"
        " max_concurrent_calls, priority, capabilities, is_active)"
        " VALUES (%s, 'vapi', 'secret-key', 'secret-secret', 'https://api.example.com', %s, %s,"
        " %s, %s) RETURNING id",
        (
            f"prov-{uuid.uuid4().hex[:8]}",
            max_calls,
            priority,
            json.dumps(capabilities or {}),
            active,
        ),
    )
    if availability:
        conn.execute(
            "INSERT INTO provider_availability (provider_id, current_calls, available_slots,"
            " status) VALUES (%s, 0, %s, 'online')",
            (pid, max_calls),
        )
    return pid


def schedule(conn: Conn, user: uuid.UUID, template: uuid.UUID, **kw: Any) -> uuid.UUID:
    args = {
        "p_user_id": user,
        "p_template_id": template,
        "p_recipient_name": "John Doe",
        "p_recipient_phone": "+15551234567",
    }
    args.update({f"p_{k}": v for k, v in kw.items()})
    names = ", ".join(f"{k} => %({k})s" for k in args)
    return one(conn, f"SELECT schedule_call({names})", args)  # type: ignore[arg-type]


def slots(conn: Conn, provider: uuid.UUID) -> tuple[int, int]:
    """(taken, free) slots of a provider, live (provider_load counts its provider_slots)."""
    row = conn.execute(
        "SELECT current_calls, available_slots FROM provider_load WHERE provider_id = %s",
        (provider,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def hold_slots(conn: Conn, provider: uuid.UUID, n: int) -> list[uuid.UUID]:
    """Take n free slots of a provider for made-up assignment ids (calls the test does not need;
    reconcile_provider_slots frees them as strays)."""
    rows = conn.execute(
        "UPDATE provider_slots s SET assignment_id = gen_random_uuid()"
        " FROM (SELECT slot_no FROM provider_slots WHERE provider_id = %(p)s"
        "       AND assignment_id IS NULL ORDER BY freed_at, slot_no LIMIT %(n)s) f"
        " WHERE s.provider_id = %(p)s AND s.slot_no = f.slot_no RETURNING s.assignment_id",
        {"p": provider, "n": n},
    ).fetchall()
    return [r[0] for r in rows]


def free_slots(conn: Conn, provider: uuid.UUID) -> None:
    """Give back every slot of a provider (after hold_slots)."""
    conn.execute(
        "UPDATE provider_slots SET assignment_id = NULL, freed_at = clock_timestamp()"
        " WHERE provider_id = %s AND assignment_id IS NOT NULL",
        (provider,),
    )


# The slot invariants, one row per violation, read in one snapshot: a provider never carries more
# live assignments than max_concurrent_calls, nor a pool's number more than its max_concurrent;
# its slots are its layout; each live assignment holds exactly one slot of its provider, with
# the slot's number as caller_id, and a taken slot belongs to a live assignment. (After a
# capacity or pool change, calls then in flight may exceed the new caps and keep their number
# until they end: check after such changes once those calls are done.)
SLOT_VIOLATIONS = """
WITH live AS (
  SELECT a.id, a.provider_id, a.caller_id FROM call_assignments a
   WHERE a.state = ANY (live_assignment_states())
)
SELECT 'over max_concurrent_calls', p.id::text FROM call_service_providers p
 WHERE (SELECT count(*) FROM live WHERE live.provider_id = p.id) > p.max_concurrent_calls
UNION ALL
SELECT 'number over its max_concurrent', p.id::text || ' ' || (e.v->>'id')
  FROM call_service_providers p
 CROSS JOIN LATERAL jsonb_array_elements(
   CASE WHEN jsonb_typeof(p.config->'caller_ids') = 'array' THEN p.config->'caller_ids'
        ELSE '[]'::jsonb END) AS e(v)
 WHERE (SELECT count(*) FROM live WHERE live.provider_id = p.id AND live.caller_id = e.v->>'id')
       > coalesce((e.v->>'max_concurrent')::int, p.max_concurrent_calls)
UNION ALL
SELECT 'slots differ from the layout', p.id::text FROM call_service_providers p
 WHERE EXISTS (
   (SELECT l.slot_no, l.caller_id FROM provider_slot_layout(p.max_concurrent_calls, p.config) l
    EXCEPT SELECT s.slot_no, s.caller_id FROM provider_slots s WHERE s.provider_id = p.id)
   UNION ALL
   (SELECT s.slot_no, s.caller_id FROM provider_slots s
     WHERE s.provider_id = p.id AND NOT s.retired
    EXCEPT SELECT l.slot_no, l.caller_id
             FROM provider_slot_layout(p.max_concurrent_calls, p.config) l))
UNION ALL
SELECT 'taken slot without a live assignment', s.provider_id::text FROM provider_slots s
 WHERE s.assignment_id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM live WHERE live.id = s.assignment_id
                      AND live.provider_id = s.provider_id)
UNION ALL
SELECT 'live assignment without its slot', live.id::text FROM live
 WHERE NOT EXISTS (SELECT 1 FROM provider_slots s WHERE s.assignment_id = live.id)
UNION ALL
SELECT 'caller id differs from its slot', live.id::text FROM live
  JOIN provider_slots s ON s.assignment_id = live.id
 WHERE s.caller_id IS DISTINCT FROM live.caller_id
"""


def slot_violations(conn: Conn) -> list[tuple[str, str]]:
    """The slot invariants that do not hold right now (empty: all hold)."""
    return [(str(r[0]), str(r[1])) for r in conn.execute(SLOT_VIOLATIONS).fetchall()]


@contextmanager
def as_role(conn: Conn, role: str, user: uuid.UUID | None = None) -> Iterator[Conn]:
    """Run inside a transaction as an API role with Supabase-style JWT claims; rolled back."""
    claims: dict[str, Any] = {"role": role}
    if user is not None:
        claims["sub"] = str(user)
    with conn.transaction(force_rollback=True):
        conn.execute(f"SET LOCAL ROLE {role}")  # type: ignore[arg-type]
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield conn


# Calling rules (20240101000140/340). The shipped defaults: 08:00-21:00 in the recipient's
# zone every day, 3 dial attempts per number per rolling 24 h. The test template opens them
# (see tests/conftest.py) so that tests of other features do not depend on the hour they run
# at or on how often they reuse a number; tests of the rules put the shipped values back.
OPEN_CALLING_RULES = (
    "UPDATE calling_windows SET start_time = '00:00', end_time = '24:00' WHERE scope = 'default';"
    " UPDATE calling_settings SET default_attempts_per_24h = 1000000"
)
SHIPPED_CALLING_RULES = (
    "UPDATE calling_windows SET start_time = '08:00', end_time = '21:00' WHERE scope = 'default';"
    " UPDATE calling_settings SET default_attempts_per_24h = 3"
)


def set_clock(conn: Conn, at: Any) -> None:
    """Pin the rules' clock (callq_now()) for every session of this database; None unpins."""
    conn.execute("UPDATE calling_settings SET test_now = %s", (at,))


@contextmanager
def as_role_committed(conn: Conn, role: str, user: uuid.UUID | None = None) -> Iterator[Conn]:
    """Like :func:`as_role`, but what runs inside is committed."""
    claims: dict[str, Any] = {"role": role}
    if user is not None:
        claims["sub"] = str(user)
    with conn.transaction():
        conn.execute(f"SET LOCAL ROLE {role}")  # type: ignore[arg-type]
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield conn
