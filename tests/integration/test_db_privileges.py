"""The privilege matrix, generated from the catalog (issue 8): every table, view, column and
function of schema public, for anon, user A, user B, an admin, service_role and callq_worker.

The policy is written as rules, not as a list of objects, so a new table, column or function
is covered without editing this file:

* anon holds no privilege on anything, and executes nothing;
* credential columns (names public.is_secret_name() recognises: api_key, webhook_secret, ...)
  are readable only by service_role and callq_worker, and writable by no API role;
* no API role writes a primary key, an owner column after insert, or a provider's
  non-operational column, and none holds TRUNCATE, TRIGGER or REFERENCES;
* on every table with an owner (a foreign key to users), user A (and the admin) can neither
  see, update, delete nor insert user B's rows (except rows a table shares: public templates);
* every reference an API role may write answers another user's private row exactly as it
  answers an id that does not exist, and never succeeds;
* every function an API role may execute, called with user B's ids, leaves B's data unchanged;
* service_role and callq_worker read every column; every function pins search_path.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from .dbutil import Conn, as_role, attempt, connect
from .test_db_rls import World, _build

API_ROLES = ("anon", "authenticated")
PRIVILEGED = ("service_role", "callq_worker")
# rows a table shows to every signed-in user, and that admins moderate (edit, delete)
SHARED = {"call_templates": "is_public"}
# tables admins manage whole (they see every row: choosing an id reveals nothing)
ADMIN_MANAGED = {"subscription_plans"}
# what an admin may change on a provider (issue 8: the rest is for ops)
OPERATIONAL = {"call_service_providers": {"name", "is_active", "priority", "max_concurrent_calls"}}


@dataclass(frozen=True)
class Column:
    table: str
    name: str
    is_key: bool
    secret: bool


@dataclass(frozen=True)
class Catalog:
    relations: list[str]  # tables and views of public
    tables: list[str]
    columns: list[Column]
    owner: dict[str, str]  # table -> its column referencing users.id
    fkeys: list[tuple[str, str, str]]  # (table, column, referenced table), single-column keys
    functions: list[tuple[str, str, list[str]]]  # (signature, name, argument types)


def read_catalog(conn: Conn) -> Catalog:
    rels = conn.execute(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'p') ORDER BY 1"
    ).fetchall()
    cols = conn.execute(
        "SELECT c.relname, a.attname,"
        "  EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary"
        "          AND a.attnum = ANY (i.indkey)),"
        "  public.is_secret_name(a.attname)"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'p') AND a.attnum > 0"
        "   AND NOT a.attisdropped ORDER BY 1, 2"
    ).fetchall()
    fks = conn.execute(
        "SELECT c.conrelid::regclass::text, a.attname, c.confrelid::regclass::text"
        " FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid"
        "  AND a.attnum = c.conkey[1]"
        " WHERE c.contype = 'f' AND cardinality(c.conkey) = 1"
        "   AND c.connamespace = 'public'::regnamespace ORDER BY 1, 2"
    ).fetchall()
    fns = conn.execute(
        "SELECT p.oid::regprocedure::text, p.proname,"
        "  array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t)"
        " FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f'"
        "   AND p.prorettype <> 'trigger'::regtype ORDER BY 1"
    ).fetchall()
    # a table's owner: its foreign key to users, or (tables without foreign keys) its user_id
    owner = {t: c for t, c in ((r[0], r[1]) for r in cols) if c == "user_id"}
    owner.update({t: c for t, c, ref in fks if ref == "users"})
    owner["users"] = "id"
    owner = {t: c for t, c in owner.items() if t in {r[0] for r in rels if r[1] in ("r", "p")}}
    return Catalog(
        relations=[r[0] for r in rels],
        tables=[r[0] for r in rels if r[1] in ("r", "p")],
        columns=[Column(*r) for r in cols],
        owner=owner,
        fkeys=[(t, c, ref) for t, c, ref in fks],
        functions=[(sig, name, list(args)) for sig, name, args in fns],
    )


@pytest.fixture
def world_catalog(db_url: str) -> Any:
    with connect(db_url) as conn:
        world = _build(conn)
        yield world, read_catalog(conn), conn


def has(conn: Conn, role: str, kind: str, obj: str, priv: str, column: str | None = None) -> bool:
    if kind == "column":
        query = "SELECT has_column_privilege(%s, %s::regclass, %s, %s)"
        return bool(conn.execute(query, (role, f"public.{obj}", column, priv)).fetchone()[0])  # type: ignore[index]
    if kind == "table":
        query = "SELECT has_table_privilege(%s, %s::regclass, %s)"
        return bool(conn.execute(query, (role, f"public.{obj}", priv)).fetchone()[0])  # type: ignore[index]
    query = "SELECT has_function_privilege(%s, %s::regprocedure, 'EXECUTE')"
    return bool(conn.execute(query, (role, obj)).fetchone()[0])  # type: ignore[index]


# --- rules on privileges ----------------------------------------------------------------------


def test_grants_follow_the_rules(world_catalog: Any) -> None:
    _w, cat, conn = world_catalog
    owners = {(t, c) for t, c in cat.owner.items() if t != "users"}
    bad: list[str] = []
    for rel in cat.relations:
        for priv in ("DELETE", "TRUNCATE", "TRIGGER", "REFERENCES"):
            for role in API_ROLES:
                allowed = priv == "DELETE" and role == "authenticated"
                if has(conn, role, "table", rel, priv) and not allowed:
                    bad.append(f"{role} {priv} {rel}")
    for col in cat.columns:
        where = f"{col.table}.{col.name}"
        for priv in ("SELECT", "INSERT", "UPDATE", "REFERENCES"):
            if has(conn, "anon", "column", col.table, priv, col.name):
                bad.append(f"anon {priv} {where}")
            for role in PRIVILEGED:
                if priv == "SELECT" and not has(conn, role, "column", col.table, priv, col.name):
                    bad.append(f"{role} cannot read {where}")
        user_insert = has(conn, "authenticated", "column", col.table, "INSERT", col.name)
        user_update = has(conn, "authenticated", "column", col.table, "UPDATE", col.name)
        if col.secret and (
            user_insert
            or user_update
            or has(conn, "authenticated", "column", col.table, "SELECT", col.name)
        ):
            bad.append(f"authenticated touches credential {where}")
        if col.is_key and (user_insert or user_update) and col.table not in ADMIN_MANAGED:
            bad.append(f"authenticated writes key {where}")
        if (col.table, col.name) in owners and user_update:
            bad.append(f"authenticated moves rows to another owner: {where}")
        allowed = OPERATIONAL.get(col.table)
        if allowed is not None and (user_insert or (user_update and col.name not in allowed)):
            bad.append(f"authenticated writes ops-only column {where}")
    for sig, _name, _args in cat.functions:
        if has(conn, "anon", "function", sig, "EXECUTE"):
            bad.append(f"anon EXECUTE {sig}")
    assert bad == []


def test_functions_pin_search_path(db_url: str) -> None:
    with connect(db_url) as conn:
        rows = conn.execute(
            "SELECT p.oid::regprocedure::text, p.proconfig,"
            " has_function_privilege('public', p.oid, 'EXECUTE')"
            " FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace"
        ).fetchall()
    assert len(rows) >= 20
    for sig, config, public_exec in rows:
        assert config and any(c.startswith("search_path=") for c in config), sig
        assert not public_exec, sig


# --- rules on rows ----------------------------------------------------------------------------


def claims(conn: Conn, user: uuid.UUID) -> None:
    conn.execute("SET LOCAL ROLE authenticated")
    conn.execute(
        "SELECT set_config('request.jwt.claims', %s, true)",
        (json.dumps({"role": "authenticated", "sub": str(user)}),),
    )


def owned(conn: Conn, cat: Catalog, table: str, user: uuid.UUID) -> list[dict[str, Any]]:
    """``user``'s rows of ``table`` as JSON (read as the superuser)."""
    return [
        r[0]
        for r in conn.execute(
            f"SELECT to_jsonb(t) FROM public.{table} t WHERE {cat.owner[table]} = %s"
            " ORDER BY to_jsonb(t)::text",  # type: ignore[arg-type]
            (user,),
        )
    ]


def snapshot(conn: Conn, cat: Catalog, user: uuid.UUID) -> str:
    """Everything of ``user``: owned rows and the rows that reference them (one level)."""
    parts: dict[str, Any] = {t: owned(conn, cat, t, user) for t in cat.owner}
    for table, column, ref in cat.fkeys:
        with_id = {c.table for c in cat.columns if c.name == "id"}
        if ref in cat.owner and ref != "users" and table not in cat.owner and ref in with_id:
            parts[f"{table}.{column}"] = [
                r[0]
                for r in conn.execute(
                    f"SELECT to_jsonb(t) FROM public.{table} t JOIN public.{ref} o"  # type: ignore[arg-type]
                    f" ON o.id = t.{column} WHERE o.{cat.owner[ref]} = %s"
                    " ORDER BY to_jsonb(t)::text",
                    (user,),
                )
            ]
    return json.dumps(parts, sort_keys=True, default=str)


def insertable(conn: Conn, table: str, granted: bool = False) -> list[str]:
    """Columns an INSERT may name (``granted``: those authenticated may insert, if any)."""
    cols = [
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped AND attgenerated = '' AND attname <> 'id' ORDER BY attnum",
            (f"public.{table}",),
        )
    ]
    if granted:
        mine = [c for c in cols if has(conn, "authenticated", "column", table, "INSERT", c)]
        return mine or cols
    return cols


def copy_statement(conn: Conn, table: str) -> str:
    """Insert a row given as JSON, naming only the columns an app user may insert."""
    cols = ", ".join(insertable(conn, table, granted=True))
    return (
        f"INSERT INTO public.{table} ({cols})"
        f" SELECT {cols} FROM jsonb_populate_record(NULL::public.{table}, %(row)s::jsonb)"
    )


def reached(outcome: int | str) -> bool:
    """A statement reached rows: it succeeded on at least one (an error is a refusal)."""
    return isinstance(outcome, int) and outcome > 0


@pytest.mark.parametrize("actor", ["a", "admin"])
def test_no_user_reaches_another_users_rows(world_catalog: Any, actor: str) -> None:
    w, cat, conn = world_catalog
    me: uuid.UUID = w.a if actor == "a" else w.admin
    bad: list[str] = []
    checked = set()
    for table in cat.owner:
        col = cat.owner[table]
        theirs = owned(conn, cat, table, w.b)
        if not theirs:  # a table the world does not fill (grants are checked above)
            continue
        checked.add(table)
        shared = SHARED.get(table)
        with as_role(conn, "authenticated", me):
            hidden = f" AND NOT {shared}" if shared else ""
            seen = attempt(conn, f"SELECT 1 FROM public.{table} WHERE {col} = %s{hidden}", (w.b,))
            if reached(seen):
                bad.append(f"{actor} sees B's {table}")
            where = f"{col} = %s" + (hidden if actor == "admin" else "")
            for c in [*insertable(conn, table), "id"]:
                got = attempt(conn, f"UPDATE public.{table} SET {c} = {c} WHERE {where}", (w.b,))
                if reached(got):
                    bad.append(f"{actor} updates B's {table}.{c}")
            if reached(attempt(conn, f"DELETE FROM public.{table} WHERE {where}", (w.b,))):
                bad.append(f"{actor} deletes B's {table}")
            got = attempt(conn, copy_statement(conn, table), {"row": json.dumps(theirs[0])})
            if reached(got):
                bad.append(f"{actor} inserts a row of B into {table}")
    assert bad == []
    assert {"users", "call_queue", "call_history", "call_templates", "user_call_usage"} <= checked


def test_references_do_not_reveal_other_users_rows(world_catalog: Any) -> None:
    """Foreign keys ignore RLS: every reference A may write answers B's private row exactly
    as it answers a missing id, and never succeeds."""
    w, cat, conn = world_catalog
    bad: list[str] = []
    probed = 0
    for table, column, ref in cat.fkeys:
        if ref not in cat.owner or table not in cat.owner:
            continue
        ins = has(conn, "authenticated", "column", table, "INSERT", column)
        upd = has(conn, "authenticated", "column", table, "UPDATE", column)
        if not (ins or upd):
            continue
        with as_role(conn, "authenticated", w.a):
            visible = {r[0] for r in conn.execute(f"SELECT id FROM public.{ref}")}  # type: ignore[arg-type]
        private = [r["id"] for r in owned(conn, cat, ref, w.b) if uuid.UUID(r["id"]) not in visible]
        mine = owned(conn, cat, table, w.a)
        if not (private and mine):  # a table the world does not fill
            continue
        for target in private:
            statements = []
            if upd:
                statements.append(
                    (
                        f"UPDATE public.{table} SET {column} = %(x)s"
                        f" WHERE {cat.owner[table]} = %(a)s",
                        {},
                    )
                )
            if ins:
                statements.append((copy_statement(conn, table), {"row": mine[0], "col": column}))
            for statement, extra in statements:
                outcomes = []
                for x in (target, str(uuid.uuid4())):
                    params: dict[str, Any] = {"a": w.a, "x": x}
                    if "row" in extra:
                        params["row"] = json.dumps({**extra["row"], column: x})
                    with as_role(conn, "authenticated", w.a):
                        outcomes.append(attempt(conn, statement, params))
                probed += 1
                if outcomes[0] != outcomes[1] or outcomes[0] not in (0, "42501"):
                    bad.append(f"{table}.{column} -> {ref}: {outcomes}")
    assert probed > 0 and bad == []


# --- rules on functions -----------------------------------------------------------------------

SAMPLE: dict[str, list[str]] = {
    "text": ["'x'"],
    "integer": ["1"],
    "bigint": ["1"],
    "boolean": ["false"],
    "double precision": ["1"],
    "numeric": ["1"],
    "jsonb": ["'{}'::jsonb", '\'[{"name": "R", "phone": "+15551234567"}]\'::jsonb'],
    "timestamp with time zone": ["now()"],
    "uuid[]": ["'{}'::uuid[]"],
}


def b_ids(conn: Conn, cat: Catalog, w: World) -> list[str]:
    ids = {str(w.b)}
    for table in cat.owner:
        ids |= {str(r["id"]) for r in owned(conn, cat, table, w.b) if "id" in r}
    return sorted(ids)


@pytest.mark.parametrize("actor", ["a", "admin"])
def test_api_functions_never_act_for_another_user(world_catalog: Any, actor: str) -> None:
    """Every function an app user may execute, given user B's ids in any uuid argument (the
    others: the caller's own id), leaves B's data as it was."""
    w, cat, conn = world_catalog
    me: uuid.UUID = w.a if actor == "a" else w.admin
    callable_ = [
        f for f in cat.functions if has(conn, "authenticated", "function", f[0], "EXECUTE")
    ]
    assert {"schedule_call", "cancel_call", "delete_my_account"} <= {f[1] for f in callable_}
    before = snapshot(conn, cat, w.b)
    theirs = b_ids(conn, cat, w)
    bad: list[str] = []
    for _sig, name, args in callable_:
        uuid_slots = [i for i, t in enumerate(args) if t == "uuid"]
        fill = [SAMPLE.get(t, ["NULL"])[0] if t != "uuid" else f"'{me}'" for t in args]
        variants: list[list[str]] = [fill]
        for b in theirs:
            variants.append(
                [f"'{b}'" if t == "uuid" else v for t, v in zip(args, fill, strict=True)]
            )
            for i in uuid_slots:
                variants.append([*fill[:i], f"'{b}'", *fill[i + 1 :]])
        for t_i, t in enumerate(args):
            for alt in SAMPLE.get(t, [])[1:]:
                variants.append([*fill[:t_i], alt, *fill[t_i + 1 :]])
        for v in variants:
            call = f"SELECT public.{name}({', '.join(v)})"
            with conn.transaction(force_rollback=True):
                claims(conn, me)
                attempt(conn, call)  # type: ignore[arg-type]
                conn.execute("RESET ROLE")
                if snapshot(conn, cat, w.b) != before:
                    bad.append(call)
    assert bad == []
