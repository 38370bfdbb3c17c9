"""The migrations as hosted Supabase applies them: the real Supabase CLI, a migrating role that
is not a superuser.

On hosted Supabase the platform (a superuser) owns the schema ``auth`` and the API roles; the
role that runs ``supabase db push`` (``postgres``) is not a superuser: it owns ``public``, holds
CREATEROLE and membership of ``anon``, ``authenticated`` and ``service_role``, and may add
triggers to ``auth.users``. This test builds that split on the test server (the platform part
as the server's superuser, with ``supabase/local/auth.sql``), pushes ``supabase/migrations`` with
the real CLI as the non-superuser owner, then checks that the schema works and that
``callq db upgrade`` agrees that nothing is left to apply.

The CLI comes from ``$SUPABASE_CLI`` (CI installs it with npm: ``.ci/run``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from models.migrate import list_migrations, supabase_dir, upgrade
from models.session import rewrite_url
from tests.conftest import _in_ci

pytestmark = pytest.mark.timeout(180)


def _cli() -> str:
    cli = os.environ.get("SUPABASE_CLI") or shutil.which("supabase")
    if not cli:
        if _in_ci():
            pytest.fail("CI=true but SUPABASE_CLI is not set (.ci/run installs the CLI)")
        pytest.skip("the Supabase CLI is not installed (set SUPABASE_CLI; CI installs it)")
    return cli


@pytest.fixture
def hosted_like(pg_admin_url: str) -> Iterator[tuple[str, str]]:
    """(superuser URL, owner URL) of a fresh database laid out like a hosted project."""
    tag = uuid.uuid4().hex[:10]
    dbname, owner = f"callq_sb_{tag}", f"callq_sb_owner_{tag}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER CREATEROLE NOBYPASSRLS").format(
                sql.Identifier(owner)
            )
        )
    super_url = rewrite_url(pg_admin_url, dbname=dbname)
    platform = (supabase_dir() / "local" / "auth.sql").read_text()
    grants = [
        "ALTER SCHEMA public OWNER TO {o}",
        "GRANT anon, authenticated, service_role TO {o} WITH ADMIN OPTION",
        "GRANT USAGE ON SCHEMA auth TO {o} WITH GRANT OPTION",
        "GRANT ALL ON auth.users TO {o} WITH GRANT OPTION",
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA auth TO {o} WITH GRANT OPTION",
        "GRANT CREATE, TEMPORARY ON DATABASE {d} TO {o}",
    ]
    with psycopg.connect(super_url, autocommit=True) as conn:
        conn.execute(platform)  # type: ignore[arg-type]
        for grant in grants:
            conn.execute(sql.SQL(grant).format(o=sql.Identifier(owner), d=sql.Identifier(dbname)))
    try:
        yield super_url, rewrite_url(super_url, user=owner)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(owner)))


def _push(cli: str, owner_url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    shutil.copytree(supabase_dir() / "migrations", workdir / "supabase" / "migrations")
    return subprocess.run(
        [cli, "db", "push", f"--remote={owner_url}", "--yes", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "SUPABASE_TELEMETRY_DISABLED": "1", "DO_NOT_TRACK": "1"},
    )


def test_cli_push_as_non_superuser_applies_every_migration(
    hosted_like: tuple[str, str], tmp_path: Path
) -> None:
    _, owner_url = hosted_like
    with psycopg.connect(owner_url) as conn:
        is_super = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert is_super.fetchone() == (False,)

    result = _push(_cli(), owner_url, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with psycopg.connect(owner_url) as conn:
        applied = {
            str(r[0])
            for r in conn.execute("SELECT version FROM supabase_migrations.schema_migrations")
        }
    assert applied == {m.version for m in list_migrations()}
    # The runner reads the same bookkeeping table: nothing is left for it to apply.
    assert upgrade(owner_url) == []


def test_pushed_schema_signup_trigger_creates_the_profile(
    hosted_like: tuple[str, str], tmp_path: Path
) -> None:
    super_url, owner_url = hosted_like
    result = _push(_cli(), owner_url, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # A sign-up on the platform side creates the profile through our trigger on auth.users.
    with psycopg.connect(super_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO auth.users (email) VALUES ('signup@example.com') RETURNING id"
        ).fetchone()
        assert row is not None
        user_id: Any = row[0]
    with psycopg.connect(owner_url, autocommit=True) as conn:
        profile = conn.execute("SELECT count(*) FROM public.users WHERE id = %s", (user_id,))
        assert profile.fetchone() == (1,)
