"""Apply supabase/migrations to a database, recording them the way the Supabase CLI does.

``upgrade(url)`` takes a transaction-level advisory lock in each of its transactions (so two
processes at once are safe: the second waits, then finds nothing to do, and so is a transaction
pooler), applies ``supabase/local/auth.sql`` where the schema
``auth`` does not exist (plain PostgreSQL), then each migration file not yet recorded in
``supabase_migrations.schema_migrations``, in version order, each in its own transaction
together with its bookkeeping row. The SQL files are the package data of ``callq_sql``
(the repository's ``supabase/`` files, carried by the wheel); set ``CALLQ_SUPABASE_DIR`` to use
another directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from callq_sql import sql_root
from models.session import connect

# Any constant works; it only has to be the same for every callq process.
ADVISORY_LOCK_KEY = 0x63616C6C71  # "callq"

_FILE_RE = re.compile(r"^(?P<version>\d+)_(?P<name>.+)\.sql$")

_BOOKKEEPING = (
    "CREATE SCHEMA IF NOT EXISTS supabase_migrations",
    "CREATE TABLE IF NOT EXISTS supabase_migrations.schema_migrations"
    " (version text NOT NULL PRIMARY KEY)",
    "ALTER TABLE supabase_migrations.schema_migrations ADD COLUMN IF NOT EXISTS statements text[]",
    "ALTER TABLE supabase_migrations.schema_migrations ADD COLUMN IF NOT EXISTS name text",
)


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path


def supabase_dir() -> Path:
    """Where the SQL lives: ``$CALLQ_SUPABASE_DIR``, else the package data of ``callq_sql``."""
    return sql_root()


def list_migrations(root: Path | None = None) -> list[Migration]:
    """Migration files in version order."""
    directory = (root or supabase_dir()) / "migrations"
    found = []
    for path in directory.glob("*.sql"):
        match = _FILE_RE.match(path.name)
        if match:
            found.append(Migration(match["version"], match["name"], path))
    return sorted(found, key=lambda m: m.version)


def applied_versions(conn: psycopg.Connection[tuple[object, ...]]) -> set[str]:
    row = conn.execute(
        "SELECT to_regclass('supabase_migrations.schema_migrations') IS NOT NULL"
    ).fetchone()
    if not row or not row[0]:
        return set()
    return {
        str(r[0]) for r in conn.execute("SELECT version FROM supabase_migrations.schema_migrations")
    }


def upgrade(url: str, *, pooled: bool | None = None) -> list[str]:
    """Apply pending migrations to the database at ``url``; return the versions applied.

    Every step is one transaction that first takes a transaction-level advisory lock and then
    looks at what is applied: two runners never apply the same file, and no lock outlives its
    transaction, so the runner is as safe through a transaction pooler as on a direct
    connection (a session-level lock would be taken on one server session and released on
    another).
    """
    root = supabase_dir()
    migrations = list_migrations(root)
    applied: list[str] = []
    with connect(url, pooled=pooled, autocommit=True) as conn:
        with conn.transaction():
            _lock(conn)
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')"
            ).fetchone()
            if not (row and row[0]):
                conn.execute((root / "local" / "auth.sql").read_text())
            for statement in _BOOKKEEPING:
                conn.execute(statement)
        for migration in migrations:
            with conn.transaction():
                _lock(conn)
                if migration.version in applied_versions(conn):
                    continue
                text = migration.path.read_text()
                conn.execute(text)
                conn.execute(
                    "INSERT INTO supabase_migrations.schema_migrations"
                    " (version, statements, name) VALUES (%s, %s, %s)",
                    (migration.version, [text], migration.name),
                )
            applied.append(migration.version)
    return applied


def _lock(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
