"""Row Level Security, basejump style: set the role and JWT claims, try the operation, assert
what is visible or what happened. Roles: anon, user A, user B, admin, service_role."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from .dbutil import (
    TABLES,
    Conn,
    as_role,
    attempt,
    connect,
    make_plan,
    make_provider,
    make_template,
    make_user,
    one,
)


@dataclass
class World:
    a: uuid.UUID
    b: uuid.UUID
    admin: uuid.UUID
    ids: dict[str, dict[str, set[uuid.UUID]]]  # table -> owner ("a", "b", "other") -> ids
    a_queue: uuid.UUID
    b_queue: uuid.UUID
    a_history: uuid.UUID
    b_history: uuid.UUID
    b_public_template: uuid.UUID
    b_private_template: uuid.UUID
    provider: uuid.UUID


def _ids(conn: Conn, query: str, params: Any = None) -> set[uuid.UUID]:
    return {r[0] for r in conn.execute(query, params)}  # type: ignore[arg-type]


def _build(conn: Conn) -> World:
    a, b, admin = make_user(conn), make_user(conn), make_user(conn, admin=True)
    make_plan(conn, name="retired")
    conn.execute("UPDATE subscription_plans SET is_active = false WHERE name = 'retired'")
    provider = make_provider(conn)
    tpl: dict[tuple[uuid.UUID, bool], uuid.UUID] = {}
    queue: dict[uuid.UUID, uuid.UUID] = {}
    history: dict[uuid.UUID, uuid.UUID] = {}
    for u in (a, b):
        conn.execute(
            "SELECT * FROM register_notification_endpoint(%s, 'https://hooks.example.com/x')", (u,)
        )
        for public in (False, True):
            tpl[(u, public)] = make_template(conn, u, public=public)
        done = one(conn, "SELECT schedule_call(%s, %s, 'R', '+15551234567')", (u, tpl[(u, False)]))
        aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (done, provider))
        one(conn, "SELECT mark_call_dialing(%s)", (aid,))
        if u == a:
            one(conn, "SELECT handle_failed_call(%s, 'busy')", (aid,))  # a retry row
            aid = one(
                conn,
                "SELECT id FROM call_assignments WHERE queue_id = %s AND state = 'failed'",
                (done,),
            )
            conn.execute("UPDATE call_queue SET scheduled_time = now() WHERE id = %s", (done,))
            aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (done, provider))
            one(conn, "SELECT mark_call_dialing(%s)", (aid,))
        history[u] = one(conn, "SELECT complete_call(%s, 42)", (aid,))
        queue[u] = one(
            conn, "SELECT schedule_call(%s, %s, 'Q', '+15551234567')", (u, tpl[(u, True)])
        )
        conn.execute(
            "INSERT INTO template_favorites (user_id, template_id) VALUES (%s, %s)",
            (u, tpl[(u, True)]),
        )
        conn.execute(
            "INSERT INTO call_feedback (call_id, user_id, rating) VALUES (%s, %s, 5)",
            (history[u], u),
        )
        one(conn, "SELECT create_campaign(%s, %s, 'C')", (u, tpl[(u, False)]))
    ids: dict[str, dict[str, set[uuid.UUID]]] = {}
    owner_col = {
        "users": "id",
        "user_subscriptions": "user_id",
        "user_call_usage": "user_id",
        "call_templates": "created_by",
        "call_history": "user_id",
        "template_favorites": "user_id",
        "call_feedback": "user_id",
        "call_queue": "user_id",
        "call_events": "user_id",
        "call_campaigns": "user_id",
        "notification_endpoints": "user_id",
        "call_notifications": "user_id",
    }
    for table in TABLES:
        col = owner_col.get(table)
        all_ids = _ids(conn, f"SELECT id FROM {table}")
        assert all_ids, f"no rows in {table}"
        per: dict[str, set[uuid.UUID]] = {"all": all_ids}
        if col:
            per["a"] = _ids(conn, f"SELECT id FROM {table} WHERE {col} = %s", (a,))
            per["b"] = _ids(conn, f"SELECT id FROM {table} WHERE {col} = %s", (b,))
            per["admin"] = _ids(conn, f"SELECT id FROM {table} WHERE {col} = %s", (admin,))
            assert per["a"] and per["b"], table
        ids[table] = per
    ids["subscription_plans"]["active"] = _ids(
        conn, "SELECT id FROM subscription_plans WHERE is_active"
    )
    ids["call_templates"]["public"] = _ids(conn, "SELECT id FROM call_templates WHERE is_public")
    return World(
        a, b, admin, ids, queue[a], queue[b], history[a], history[b],
        tpl[(b, True)], tpl[(b, False)], provider,
    )  # fmt: skip


@pytest.fixture
def world_conn(db_url: str) -> Any:
    with connect(db_url) as conn:
        yield _build(conn), conn


def expected_visible(world: World, who: str, table: str) -> set[uuid.UUID] | None:
    """What ``who`` sees with SELECT id; None = permission denied."""
    per = world.ids[table]
    if who == "anon":
        return None
    if table in OPS_ONLY:  # no API role but service_role may read it
        return per["all"] if who == "service_role" else None
    if who == "service_role" or (who == "admin" and table in ADMIN_TABLES - {"call_templates"}):
        return per["all"]
    if table == "subscription_plans":
        return per["active"]
    if table == "call_templates":
        return per[who] | per["public"]
    if table in ADMIN_TABLES:  # the operational ones (plans and templates handled above)
        return set()
    return per[who]


def _as(world: World, who: str) -> tuple[str, uuid.UUID | None]:
    return {
        "anon": ("anon", None),
        "a": ("authenticated", world.a),
        "b": ("authenticated", world.b),
        "admin": ("authenticated", world.admin),
        "service_role": ("service_role", None),
    }[who]


WHO = ["anon", "a", "b", "admin", "service_role"]
# no API role holds UPDATE on these
READ_ONLY_FOR_USERS = {
    "user_subscriptions",
    "user_call_usage",
    "call_history",
    "template_favorites",
    "call_queue",
    "provider_availability",
    "call_assignments",
    "call_retries",
}
# tables admins manage for everyone; on the per-user tables an admin sees only its own rows
ADMIN_TABLES = {
    "subscription_plans",
    "call_templates",
    "call_service_providers",
    "provider_availability",
    "call_assignments",
    "call_retries",
}


# Tables for ops only (and the worker role), not for app users or admins.
OPS_ONLY = {"ops_settings"}
# The call-event log's writers run as its owner (see 20240101000330_events.sql).
EVENT_DEFINERS = {
    "call_queue_log_insert",
    "call_queue_log_status",
    "call_assignments_log_insert",
    "call_assignments_log_state",
    "users_forget_call_events",
    "record_call_event",
    "prune_call_events",
}


@pytest.mark.parametrize("who", WHO)
def test_select_matrix(world_conn: tuple[World, Conn], who: str) -> None:
    world, conn = world_conn
    role, uid = _as(world, who)
    with as_role(conn, role, uid):
        for table in TABLES:
            expected = expected_visible(world, who, table)
            try:
                with conn.transaction():
                    got: set[uuid.UUID] | None = _ids(conn, f"SELECT id FROM {table}")
            except psycopg.errors.InsufficientPrivilege:
                got = None
            assert got == expected, (who, table)


@pytest.mark.parametrize("who", ["anon", "a", "admin"])
def test_provider_credentials_are_never_readable_by_api_roles(
    world_conn: tuple[World, Conn], who: str
) -> None:
    world, conn = world_conn
    role, uid = _as(world, who)
    with as_role(conn, role, uid):
        for query in (
            "SELECT api_key FROM call_service_providers",
            "SELECT api_secret FROM call_service_providers",
            "SELECT * FROM call_service_providers",
            "SELECT p FROM call_service_providers p",
        ):
            assert attempt(conn, query) == "42501", query
        view = attempt(conn, "SELECT name FROM call_service_providers_public")
        assert view == ("42501" if who == "anon" else (1 if who == "admin" else 0))
    with as_role(conn, "service_role"):
        assert one(conn, "SELECT api_key FROM call_service_providers") == "secret-key"


def test_user_writes(world_conn: tuple[World, Conn]) -> None:
    w, conn = world_conn
    a, b = w.a, w.b
    with as_role(conn, "authenticated", a):
        # profile: own only, never is_admin
        assert attempt(conn, "UPDATE users SET full_name = 'A' WHERE id = %s", (a,)) == 1
        assert attempt(conn, "UPDATE users SET full_name = 'A' WHERE id = %s", (b,)) == 0
        assert attempt(conn, "UPDATE users SET is_admin = true WHERE id = %s", (a,)) == "42501"
        assert attempt(conn, "INSERT INTO users (id) VALUES (%s)", (uuid.uuid4(),)) == "42501"
        # subscriptions, usage, history: read only; the profile is closed, never deleted
        assert attempt(conn, "UPDATE user_subscriptions SET status = 'active'") == "42501"
        assert attempt(conn, "UPDATE user_call_usage SET calls_made = 0") == "42501"
        assert attempt(conn, "DELETE FROM call_history") == "42501"
        assert attempt(conn, "DELETE FROM users WHERE id = %s", (a,)) == "42501"
        assert (
            attempt(
                conn,
                "INSERT INTO user_subscriptions (user_id, plan_id)"
                " SELECT %s, id FROM subscription_plans LIMIT 1",
                (a,),
            )
            == "42501"
        )
        # templates: create/change own, never others'
        ins = "INSERT INTO call_templates (created_by, name, script) VALUES (%s, 'n', 's')"
        assert attempt(conn, ins, (a,)) == 1
        assert attempt(conn, ins, (b,)) == "42501"
        assert (
            attempt(
                conn, "UPDATE call_templates SET name = 'x' WHERE id = %s", (w.b_public_template,)
            )
            == 0
        )
        assert attempt(conn, "UPDATE call_templates SET created_by = %s WHERE created_by = %s",
                       (b, a)) == "42501"  # fmt: skip
        assert attempt(conn, "DELETE FROM call_templates WHERE created_by = %s", (b,)) == 0
        # favorites: own, of visible templates
        fav = "INSERT INTO template_favorites (user_id, template_id) VALUES (%s, %s)"
        assert attempt(conn, fav, (a, w.b_public_template)) == 1
        assert attempt(conn, fav, (a, w.b_private_template)) == "42501"
        assert attempt(conn, fav, (b, w.b_public_template)) == "42501"
        # feedback: own, on own calls
        assert attempt(conn, "UPDATE call_feedback SET rating = 1") == 1
        assert attempt(conn, "UPDATE call_feedback SET rating = 9") == "23514"
        fb = "INSERT INTO call_feedback (call_id, user_id, rating) VALUES (%s, %s, 4)"
        assert attempt(conn, fb, (w.b_history, a)) == "42501"
        assert attempt(conn, "DELETE FROM call_feedback") == 1
        assert attempt(conn, fb, (w.a_history, a)) == 1
        # queue: no direct write at all (cancel_call, test_db_tenancy)
        assert (
            attempt(
                conn,
                "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone)"
                " SELECT %s, template_id, 'x', '+15551234567' FROM call_queue LIMIT 1",
                (a,),
            )
            == "42501"
        )
        assert attempt(conn, "UPDATE call_queue SET priority = 1 WHERE id = %s", (w.a_queue,)) == (
            "42501"
        )
        assert (
            attempt(conn, "UPDATE call_queue SET status = 'completed' WHERE id = %s", (w.a_queue,))
            == "42501"
        )
        cancel = "UPDATE call_queue SET status = 'canceled' WHERE id = %s"
        assert attempt(conn, cancel, (w.b_queue,)) == "42501"
        assert attempt(conn, cancel, (w.a_queue,)) == "42501"
        assert attempt(conn, "UPDATE call_queue SET template_id = NULL") == "42501"
        assert attempt(conn, "DELETE FROM call_queue") == "42501"
        # operational tables: nothing
        assert attempt(conn, "UPDATE provider_availability SET available_slots = 100") == "42501"
        assert attempt(conn, "UPDATE call_service_providers SET priority = 1") == 0
        assert attempt(conn, "DELETE FROM call_assignments") == "42501"
        assert (
            attempt(
                conn,
                "INSERT INTO call_service_providers (name, provider_type, api_key, base_url)"
                " VALUES ('evil', 'vapi', 'k', 'https://evil')",
            )
            == "42501"
        )
        # worker functions are not for users
        for fn in (
            "SELECT * FROM claim_and_assign_calls()",
            "SELECT * FROM get_next_call_in_queue()",
            "SELECT complete_call(gen_random_uuid())",
            "SELECT reconcile_provider_slots()",
        ):
            assert attempt(conn, fn) == "42501", fn


def test_admin_manages_operational_tables(world_conn: tuple[World, Conn]) -> None:
    w, conn = world_conn
    with as_role(conn, "authenticated", w.admin):
        assert (
            attempt(
                conn,
                "INSERT INTO call_service_providers (name, provider_type, api_key, base_url)"
                " VALUES ('new', 'synthflow', 'k', 'https://api.synthflow.com')",
            )
            == "42501"
        )
        # operational columns only: never credentials, endpoint, type or config; no delete
        for column in ("priority", "is_active", "max_concurrent_calls", "name"):
            assert attempt(conn, f"UPDATE call_service_providers SET {column} = {column}"
                           " WHERE id = %s", (w.provider,)) == 1, column  # fmt: skip
        for column in ("api_key", "api_secret", "webhook_secret", "base_url", "provider_type",
                       "config", "capabilities", "id"):  # fmt: skip
            assert attempt(conn, f"UPDATE call_service_providers SET {column} = {column}") == (
                "42501"
            ), column
        assert attempt(conn, "DELETE FROM call_service_providers") == "42501"
        # the worker's live state is read only (it would wedge calls or slots)
        assert attempt(conn, "UPDATE provider_availability SET status = 'degraded'") == "42501"
        assert attempt(conn, "UPDATE call_assignments SET state = 'placed'") == "42501"
        assert attempt(conn, "DELETE FROM call_retries") == "42501"
        # system and public templates (moderation), never another user's private one
        templates = w.ids["call_templates"]
        assert attempt(conn, "UPDATE call_templates SET category = 'x'") == len(
            templates["public"] | templates["admin"]
        )
        assert attempt(conn, "SELECT 1 FROM call_templates WHERE id = %s",
                       (w.b_private_template,)) == 0  # fmt: skip
        # admin does not make itself less or more than is_admin: column is not updatable
        assert attempt(conn, "UPDATE users SET is_admin = false") == "42501"


def test_anon_can_do_nothing(world_conn: tuple[World, Conn]) -> None:
    _w, conn = world_conn
    with as_role(conn, "anon"):
        assert attempt(conn, "INSERT INTO call_templates (name, script) VALUES ('n', 's')") == (
            "42501"
        )
        assert attempt(conn, "UPDATE call_queue SET status = 'canceled'") == "42501"
        assert attempt(conn, "SELECT public.is_admin()") == "42501"


def test_service_role_and_worker_role_see_everything(world_conn: tuple[World, Conn]) -> None:
    w, conn = world_conn
    for role in ("service_role", "callq_worker"):
        with as_role(conn, role):
            for table in TABLES:
                assert _ids(conn, f"SELECT id FROM {table}") == w.ids[table]["all"], (role, table)
            assert attempt(conn, "SELECT reconcile_provider_slots()") == 1
            assert attempt(conn, "SELECT * FROM claim_and_assign_calls(1)") >= 0
            assert one(conn, "SELECT api_key FROM call_service_providers") == "secret-key"


def test_functions_are_pinned_and_definer_only_where_needed(db_url: str) -> None:
    with connect(db_url) as conn:
        rows = conn.execute(
            "SELECT p.proname, p.prosecdef, p.proconfig, has_function_privilege('public',"
            " p.oid, 'EXECUTE') FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'public'"
        ).fetchall()
    assert len(rows) >= 20
    definers = {name for name, secdef, _, _ in rows if secdef}
    assert definers == EVENT_DEFINERS | {
        "schedule_call",
        "handle_new_user",
        "is_admin",
        # plans: the queue's counter triggers also run for statements of app users (a cancel)
        "count_tenant_calls",
        "zero_tenant_counters",
        "cancel_call",
        "delete_my_account",
        "handle_deleted_user",
        # campaigns: app users act on their own campaigns through these only
        "create_campaign",
        "schedule_calls",
        "pause_campaign",
        "resume_campaign",
        "cancel_campaign",
        "set_campaign_pacing",
        "reschedule_call",
        "register_notification_endpoint",
        "rotate_notification_secret",
        # the outbox writer runs for whoever ends a call
        "enqueue_call_notifications",
        # slots: an admin changing max_concurrent_calls lays out slots it may not write
        "sync_provider_slots",
    }
    for name, _, config, public_exec in rows:
        assert config and any(c.startswith("search_path=") for c in config), name
        assert not public_exec, name


def test_user_policies_stay_indexable(world_conn: tuple[World, Conn]) -> None:
    """A user's unfiltered API read of a per-user table can use its user_id index (no admin
    OR-clause defeats it)."""
    w, conn = world_conn
    with as_role(conn, "authenticated", w.a):
        conn.execute("SET LOCAL enable_seqscan = off")
        for query, index in (
            ("SELECT * FROM call_history ORDER BY created_at DESC LIMIT 50",
             "call_history_user_created_idx"),
            ("SELECT * FROM call_queue ORDER BY created_at DESC LIMIT 50",
             "call_queue_user_created_idx"),
        ):  # fmt: skip
            plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {query}"))
            assert index in plan, plan


# One valid new row per table, owned by %(uid)s; the expected outcome per role:
# a row count (1) or the SQLSTATE (42501 = no privilege or the row violates the policies).
INSERTS: dict[str, tuple[str, dict[str, int | str]]] = {
    "users": (
        "INSERT INTO users (id) VALUES (%(spare_user)s)",
        {"a": "42501", "admin": "42501"},
    ),
    "subscription_plans": (
        "INSERT INTO subscription_plans (name) VALUES ('plan-' || gen_random_uuid())",
        {"a": "42501", "admin": 1},
    ),
    "user_subscriptions": (
        "INSERT INTO user_subscriptions (user_id, plan_id, status)"
        " SELECT %(uid)s, id, 'canceled' FROM subscription_plans LIMIT 1",
        {"a": "42501", "admin": "42501"},
    ),
    "user_call_usage": (
        "INSERT INTO user_call_usage (user_id, period_start, period_end)"
        " VALUES (%(uid)s, now() - interval '9 months', now() - interval '8 months')",
        {"a": "42501", "admin": "42501"},
    ),
    "call_templates": (
        "INSERT INTO call_templates (created_by, name, script) VALUES (%(uid)s, 'n', 's')",
        {"a": 1, "admin": 1},
    ),
    "call_history": (
        "INSERT INTO call_history (user_id, recipient_name, recipient_phone, status)"
        " VALUES (%(uid)s, 'R', '+15551234567', 'completed')",
        {"a": "42501", "admin": "42501"},
    ),
    "template_favorites": (
        "INSERT INTO template_favorites (user_id, template_id)"
        " SELECT %(uid)s, id FROM call_templates WHERE is_public"
        " AND id NOT IN (SELECT template_id FROM template_favorites WHERE user_id = %(uid)s)"
        " LIMIT 1",
        {"a": 1, "admin": 1},
    ),
    "call_service_providers": (
        "INSERT INTO call_service_providers (name, provider_type, api_key, base_url)"
        " VALUES ('p-' || gen_random_uuid(), 'vapi', 'k', 'https://x')",
        {"a": "42501", "admin": "42501"},
    ),
    "call_queue": (
        "INSERT INTO call_queue (user_id, template_id, recipient_name, recipient_phone)"
        " SELECT %(uid)s, id, 'R', '+15551234567' FROM call_templates"
        " WHERE created_by = %(uid)s LIMIT 1",
        {"a": "42501", "admin": "42501"},
    ),
    "provider_availability": (
        "INSERT INTO provider_availability (provider_id, available_slots) VALUES (%(spare)s, 3)",
        {"a": "42501", "admin": "42501"},
    ),
    "call_assignments": (
        "INSERT INTO call_assignments (queue_id, provider_id, state)"
        " VALUES (%(queue)s, %(provider)s, 'released')",
        {"a": "42501", "admin": "42501"},
    ),
    "call_retries": (
        "INSERT INTO call_retries (queue_id, attempt, reason) VALUES (%(queue)s, 9, 'busy')",
        {"a": "42501", "admin": "42501"},
    ),
}


@pytest.mark.parametrize("who", ["anon", "a", "admin", "service_role"])
def test_insert_matrix(world_conn: tuple[World, Conn], who: str) -> None:
    world, conn = world_conn
    spare = make_provider(conn, availability=False)
    spare_user = make_user(conn, subscribed=False)
    conn.execute("DELETE FROM users WHERE id = %s", (spare_user,))  # auth user without profile
    role, uid = _as(world, who)
    params = {
        "uid": uid or world.a,
        "spare": spare,
        "spare_user": spare_user,
        "queue": world.a_queue,
        "provider": world.provider,
    }
    got: dict[str, int | str] = {}
    with as_role(conn, role, uid):
        for table, (statement, _) in INSERTS.items():
            got[table] = attempt(conn, statement, params)
    expected = {
        table: ("42501" if who == "anon" else 1 if who == "service_role" else outcomes[who])
        for table, (_, outcomes) in INSERTS.items()
    }
    assert got == expected


UPDATES: dict[str, str] = {
    "users": "UPDATE users SET full_name = full_name",
    "subscription_plans": "UPDATE subscription_plans SET description = description",
    "user_subscriptions": "UPDATE user_subscriptions SET cancel_at_period_end = false",
    "user_call_usage": "UPDATE user_call_usage SET calls_limit = calls_limit",
    "call_templates": "UPDATE call_templates SET description = description",
    "call_history": "UPDATE call_history SET error = error",
    "template_favorites": "UPDATE template_favorites SET created_at = created_at",
    "call_feedback": "UPDATE call_feedback SET comment = comment",
    "call_service_providers": "UPDATE call_service_providers SET priority = priority",
    "call_queue": "UPDATE call_queue SET status = 'canceled' WHERE status = 'queued'",
    "provider_availability": "UPDATE provider_availability SET latency_ms = latency_ms",
    "call_assignments": "UPDATE call_assignments SET error = error",
    "call_retries": "UPDATE call_retries SET error = error",
}


@pytest.mark.parametrize("who", ["anon", "a", "admin", "service_role"])
def test_update_matrix(world_conn: tuple[World, Conn], who: str) -> None:
    world, conn = world_conn
    queued = {
        k: int(one(conn, "SELECT count(*) FROM call_queue WHERE status = 'queued'" + w, p))
        for k, w, p in (
            ("all", "", None),
            ("a", " AND user_id = %s", (world.a,)),
        )
    }
    role, uid = _as(world, who)
    with as_role(conn, role, uid):
        got = {table: attempt(conn, statement) for table, statement in UPDATES.items()}

    def everything(table: str) -> int:
        return queued["all"] if table == "call_queue" else len(world.ids[table]["all"])

    if who == "anon":
        expected: dict[str, int | str] = dict.fromkeys(UPDATES, "42501")
    elif who == "service_role":
        expected = {table: everything(table) for table in UPDATES}
    else:
        expected = dict.fromkeys(UPDATES, 0)
        # written only by billing and the worker's functions; favorites are added and removed
        for table in READ_ONLY_FOR_USERS:
            expected[table] = "42501"
        expected["users"] = 1  # own profile
        if who == "a":
            expected["call_templates"] = len(world.ids["call_templates"]["a"])
            expected["call_feedback"] = 1
        else:
            for table in ADMIN_TABLES - READ_ONLY_FOR_USERS:
                expected[table] = everything(table)
            templates = world.ids["call_templates"]
            expected["call_templates"] = len(templates["public"] | templates["admin"])
    assert got == expected
