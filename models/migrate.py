"""Apply supabase/migrations to a database, recording them the way the Supabase CLI does.

``upgrade(url)`` takes a session-level advisory lock (so two processes at once are safe: the
second waits, then finds nothing to do), applies ``supabase/local/auth.sql`` where the schema
``auth`` does not exist (plain PostgreSQL), then each migration file not yet recorded in
``supabase_migrations.schema_migrations``, in version order, each in its own transaction
together with its bookkeeping row. The SQL files are read from the repository
(``<repo>/supabase``); set ``CALLQ_SUPABASE_DIR`` to use another directory (e.g. when the package
is installed without the repository).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from models.session import libpq_url

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
    """Where the SQL lives: ``$CALLQ_SUPABASE_DIR`` or ``<repo>/supabase``."""
    env = os.environ.get("CALLQ_SUPABASE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "supabase"


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


def upgrade(url: str) -> list[str]:
    """Apply pending migrations to the database at ``url``; return the versions applied."""
    root = supabase_dir()
    migrations = list_migrations(root)
    applied: list[str] = []
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')"
            ).fetchone()
            if not (row and row[0]):
                with conn.transaction():
                    conn.execute((root / "local" / "auth.sql").read_text())
            with conn.transaction():
                for statement in _BOOKKEEPING:
                    conn.execute(statement)
            done = applied_versions(conn)
            for migration in migrations:
                if migration.version in done:
                    continue
                text = migration.path.read_text()
                with conn.transaction():
                    conn.execute(text)
                    conn.execute(
                        "INSERT INTO supabase_migrations.schema_migrations"
                        " (version, statements, name) VALUES (%s, %s, %s)",
                        (migration.version, [text], migration.name),
                    )
                applied.append(migration.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    return applied
