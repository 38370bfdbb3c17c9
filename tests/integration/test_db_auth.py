"""The local auth shim (plain PostgreSQL) and the profile trigger, Supabase style."""

from __future__ import annotations

import json
import uuid

from .dbutil import as_role, connect, one


def test_auth_functions_read_jwt_claims_like_supabase(db_url: str) -> None:
    uid = uuid.uuid4()
    with connect(db_url) as conn:
        assert one(conn, "SELECT auth.uid()") is None
        with conn.transaction(force_rollback=True):
            claims = {"sub": str(uid), "role": "authenticated", "email": "a@example.com"}
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
            assert one(conn, "SELECT auth.uid()") == uid
            assert one(conn, "SELECT auth.role()") == "authenticated"
            assert one(conn, "SELECT auth.email()") == "a@example.com"
            assert one(conn, "SELECT auth.jwt() ->> 'sub'") == str(uid)
        with conn.transaction(force_rollback=True):  # legacy per-claim settings
            conn.execute("SELECT set_config('request.jwt.claim.sub', %s, true)", (str(uid),))
            assert one(conn, "SELECT auth.uid()") == uid
        roles = dict(
            conn.execute(
                "SELECT rolname, rolbypassrls FROM pg_roles WHERE rolname IN"
                " ('anon', 'authenticated', 'service_role', 'callq_worker')"
            ).fetchall()
        )
        assert roles == {
            "anon": False,
            "authenticated": False,
            "service_role": True,
            "callq_worker": False,
        }


def test_new_auth_user_gets_a_profile(db_url: str) -> None:
    uid = uuid.uuid4()
    with connect(db_url) as conn:
        conn.execute(
            "INSERT INTO auth.users (id, email, raw_user_meta_data) VALUES (%s, 'n@example.com',"
            ' \'{"full_name": "Nia", "avatar_url": "https://a/x.png"}\')',
            (uid,),
        )
        row = conn.execute(
            "SELECT email, full_name, avatar_url, is_admin FROM users WHERE id = %s", (uid,)
        ).fetchone()
        assert row == ("n@example.com", "Nia", "https://a/x.png", False)
        with as_role(conn, "authenticated", uid):
            assert one(conn, "SELECT full_name FROM users") == "Nia"
            assert one(conn, "SELECT is_admin()") is False
        # deleting the auth user closes the account: the profile stays, anonymised
        conn.execute("DELETE FROM auth.users WHERE id = %s", (uid,))
        row = conn.execute(
            "SELECT email, full_name, deleted_at IS NOT NULL FROM users WHERE id = %s", (uid,)
        ).fetchone()
        assert row == (None, None, True)


def test_deleting_a_user_cancels_its_calls_and_frees_others_templates(db_url: str) -> None:
    from .dbutil import make_template, make_user, schedule

    with connect(db_url) as conn:
        user = make_user(conn)
        tpl = make_template(conn, user)
        mine = schedule(conn, user, tpl)
        other = make_user(conn)
        other_tpl = make_template(conn, other)
        schedule(conn, other, other_tpl)
        # a template with queued calls can be deleted: the calls keep their snapshot
        conn.execute("DELETE FROM call_templates WHERE id = %s", (other_tpl,))
        assert one(conn, "SELECT count(*) FROM call_queue WHERE template_snapshot IS NOT NULL") == 2
        # deleting a user closes the account: calls canceled, rows kept, templates gone
        conn.execute("DELETE FROM auth.users WHERE id = %s", (user,))
        assert one(conn, "SELECT status FROM call_queue WHERE id = %s", (mine,)) == "canceled"
        assert one(conn, "SELECT count(*) FROM call_queue") == 2
        assert one(conn, "SELECT count(*) FROM call_templates") == 0
