"""The migration runner and the models against the migrated database."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from sqlalchemy import inspect

from models.migrate import list_migrations, upgrade
from models.session import make_engine, normalize_url
from models.tables import ALL_MODELS, Base

from .dbutil import DOMAIN_TABLES, RULES_TABLES, TABLES, connect, one

EXPECTED_TABLES = set(TABLES) | set(DOMAIN_TABLES)


def test_upgrade_applies_everything_once_and_records_versions(empty_db_url: str) -> None:
    versions = [m.version for m in list_migrations()]
    assert versions[:2] == ["20240101000000", "20240101000100"]

    assert upgrade(empty_db_url) == versions
    assert upgrade(empty_db_url) == []  # second run is a no-op

    with connect(empty_db_url) as conn:
        rows = conn.execute(
            "SELECT version, name, cardinality(statements) FROM"
            " supabase_migrations.schema_migrations ORDER BY version"
        ).fetchall()
        assert [r[0] for r in rows] == versions
        assert rows[0][1] == "initial_schema" and rows[1][1] == "queue_and_providers"
        assert all(r[2] == 1 for r in rows)
        tables = {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT tablename, rowsecurity FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        # all of them (and the calling rules' reference and settings tables), all with RLS
        assert set(tables) == EXPECTED_TABLES | set(RULES_TABLES)
        assert all(tables.values()), tables
        assert one(conn, "SELECT to_regprocedure('auth.uid()') IS NOT NULL")


def test_upgrade_from_two_threads_at_once(empty_db_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        try:
            barrier.wait()
            results.append(upgrade(empty_db_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    # Each step takes the lock for its own transaction (safe through a transaction pooler), so
    # the two runners may share the work: every migration applied once, by one of them.
    versions = [m.version for m in list_migrations()]
    assert sorted(results[0] + results[1]) == versions
    with connect(empty_db_url) as conn:
        recorded = [
            r[0]
            for r in conn.execute(
                "SELECT version FROM supabase_migrations.schema_migrations ORDER BY version"
            )
        ]
    assert recorded == versions


def test_libpq_socket_url_and_normalize() -> None:
    assert normalize_url("postgresql://postgres@/postgres?host=/tmp/x") == (
        "postgresql+psycopg://postgres@/postgres?host=/tmp/x"
    )
    assert normalize_url("postgres://u:p@h:5432/d").startswith("postgresql+psycopg://u:p@h")
    assert normalize_url("postgresql+psycopg://h/d") == "postgresql+psycopg://h/d"


def test_make_engine_connects(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM call_queue").scalar() == 0
    finally:
        engine.dispose()


def _type_name(sa_type: Any, dialect: Any) -> str:
    item = getattr(sa_type, "item_type", None)
    if item is not None:
        return "array:" + _type_name(item, dialect)
    return _norm_type(str(sa_type.compile(dialect=dialect)))


def _norm_type(sql_type: str) -> str:
    t = sql_type.lower()
    if t.endswith("[]"):
        return "array:" + _norm_type(t[:-2])
    for prefix, name in (
        ("uuid", "uuid"),
        ("timestamp", "timestamptz"),
        ("datetime", "timestamptz"),
        ("varchar", "text"),
        ("text", "text"),
        ("jsonb", "jsonb"),
        ("bool", "boolean"),
        ("bigint", "bigint"),
        ("smallint", "smallint"),
        ("int", "integer"),
        ("numeric", "numeric"),
    ):
        if t.startswith(prefix):
            return name
    return t


def test_models_match_migrated_database(db_url: str) -> None:
    """Tables, columns, types (roughly) and nullability of models.tables vs the real schema."""
    assert {m.__tablename__ for m in ALL_MODELS} == EXPECTED_TABLES
    assert set(Base.metadata.tables) == EXPECTED_TABLES
    engine = make_engine(db_url)
    try:
        insp = inspect(engine)
        assert set(insp.get_table_names(schema="public")) >= EXPECTED_TABLES
        problems: list[str] = []
        for name, table in Base.metadata.tables.items():
            db_cols = {c["name"]: c for c in insp.get_columns(name, schema="public")}
            model_cols = {c.name: c for c in table.columns}
            if set(db_cols) != set(model_cols):
                problems.append(
                    f"{name}: only in db {set(db_cols) - set(model_cols)},"
                    f" only in model {set(model_cols) - set(db_cols)}"
                )
                continue
            for col_name, col in model_cols.items():
                db_col = db_cols[col_name]
                if bool(db_col["nullable"]) != bool(col.nullable):
                    problems.append(f"{name}.{col_name}: nullable db={db_col['nullable']}")
                db_type = _type_name(db_col["type"], engine.dialect)
                model_type = _type_name(col.type, engine.dialect)
                if db_type != model_type:
                    problems.append(f"{name}.{col_name}: type db={db_type} model={model_type}")
            db_fks = {
                (tuple(fk["constrained_columns"]), fk["referred_table"])
                for fk in insp.get_foreign_keys(name, schema="public")
                if fk["referred_schema"] in (None, "public")
            }
            model_fks = {((fk.parent.name,), fk.column.table.name) for fk in table.foreign_keys}
            if db_fks != model_fks:
                problems.append(f"{name}: foreign keys db={db_fks} model={model_fks}")
        assert not problems, "\n".join(problems)
    finally:
        engine.dispose()


def test_failed_migration_is_rolled_back_and_not_recorded(
    empty_db_url: str, tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from pathlib import Path

    from models import migrate

    root = Path(str(tmp_path)) / "supabase"
    shutil.copytree(migrate.supabase_dir(), root)
    (root / "migrations" / "20990101000000_broken.sql").write_text(
        "CREATE TABLE public.half_done (id int);\nSELECT no_such_function();\n"
    )
    monkeypatch.setenv("CALLQ_SUPABASE_DIR", str(root))
    with pytest.raises(psycopg.errors.UndefinedFunction):
        upgrade(empty_db_url)
    with connect(empty_db_url) as conn:
        assert one(conn, "SELECT to_regclass('public.half_done') IS NULL")
        assert (
            one(conn, "SELECT count(*) FROM supabase_migrations.schema_migrations")
            == len(list_migrations()) - 1
        )


def test_hot_tables_have_their_storage_and_autovacuum_settings(db_url: str) -> None:
    with connect(db_url) as conn:
        opts = {
            name: dict(o.split("=", 1) for o in (reloptions or []))
            for name, reloptions in conn.execute(
                "SELECT relname, reloptions FROM pg_class WHERE relname IN"
                " ('call_queue', 'call_assignments', 'provider_availability')"
                " AND relnamespace = 'public'::regnamespace"
            )
        }
    assert set(opts) == {"call_queue", "call_assignments", "provider_availability"}
    for name, o in opts.items():
        assert o["autovacuum_vacuum_scale_factor"] == "0", name
        assert 1000 <= int(o["autovacuum_vacuum_threshold"]) <= 5000, name
        assert o["autovacuum_vacuum_cost_delay"] == "0", name
        assert 50 <= int(o["fillfactor"]) <= 80, name
