"""The worker refuses a provider row that points its keys elsewhere or names its environment.

Real PostgreSQL, the worker's own code in process; the "elsewhere" is a listening socket that
counts connections, so "no request sent" means no TCP connection at all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from providers.simulator import Simulator
from worker import runtime
from worker.seed import Seeded, schedule_calls, seed_demo
from worker.settings import get_settings


class Trap:
    """A TCP listener that only counts the connections it receives."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def trap() -> Iterator[Trap]:
    t = Trap()
    yield t
    t.close()


@pytest.fixture
def worker_db(db_url: str, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """As the shared fixture, but only the simulator's exact origin is allowed (not the trap)."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("CALLQ_PROVIDER_ALLOWED_HOSTS", sim.base_url)
    get_settings.cache_clear()
    runtime.reset()
    yield db_url
    runtime.reset()
    get_settings.cache_clear()


@pytest.fixture
def conn(worker_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(worker_db, autocommit=True) as c:
        yield c


@pytest.fixture
def seeded(conn: psycopg.Connection[Any], sim: Simulator) -> Seeded:
    return seed_demo(conn, sim_base_url=sim.base_url)


def place_one(conn: psycopg.Connection[Any], seeded: Seeded, provider: str) -> tuple[str, Any]:
    """Schedule one call, claim it onto ``provider`` and place it in process."""
    from worker.tasks import dispatch_chunk

    others = [v for k, v in seeded.provider_ids.items() if k != provider]
    deactivate = "UPDATE call_service_providers SET is_active = false WHERE id = ANY(%s)"
    conn.execute(deactivate, (others,))
    [queue_id] = schedule_calls(conn, seeded, 1)
    [assigned] = runtime.database().claim_and_assign(1, "test", 60)
    conn.execute("UPDATE call_service_providers SET is_active = true WHERE id = ANY(%s)", (others,))
    [step] = dispatch_chunk([str(assigned.assignment_id)])
    return step.label, queue_id


def retry_errors(conn: psycopg.Connection[Any], queue_id: Any) -> list[str]:
    rows = conn.execute("SELECT error FROM call_retries WHERE queue_id = %s", (queue_id,))
    return [str(r[0]) for r in rows.fetchall()]


def test_a_row_pointing_elsewhere_fails_over_and_nothing_is_sent(
    conn: psycopg.Connection[Any], seeded: Seeded, sim: Simulator, trap: Trap
) -> None:
    from worker.tasks import health_check

    vapi = seeded.provider_ids["vapi"]
    # what a hostile app admin did on the old main: the key would go to the trap
    conn.execute(
        "UPDATE call_service_providers SET base_url = %s WHERE id = %s", (trap.url + "/vapi", vapi)
    )
    result, queue_id = place_one(conn, seeded, "vapi")
    assert result == "retry_scheduled"
    [error] = retry_errors(conn, queue_id)
    assert "config_error" in error and "base_url" in error and trap.url not in error
    row = conn.execute(
        "SELECT status, %s = ANY(excluded_provider_ids) FROM call_queue WHERE id = %s",
        (vapi, queue_id),
    ).fetchone()
    assert row == ("queued", True)  # failed over: the next attempt goes to another provider

    health_check.run()  # the probe does not go there either
    last_error = conn.execute(
        "SELECT last_error FROM provider_availability WHERE provider_id = %s", (vapi,)
    ).fetchone()
    assert last_error == ("ConfigError",)
    assert trap.connections == 0
    assert sim.stats()["total_creates"] == 0


def test_env_reference_to_the_workers_environment_is_refused(
    conn: psycopg.Connection[Any],
    seeded: Seeded,
    sim: Simulator,
    worker_db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOME_TIMEOUT", "postgresql://canary-user:canary-pw@db/x")
    synthflow = seeded.provider_ids["synthflow"]
    conn.execute(
        "UPDATE call_service_providers SET api_key = 'env:DATABASE_URL' WHERE id = %s",
        (synthflow,),
    )
    result, queue_id = place_one(conn, seeded, "synthflow")
    assert result == "retry_scheduled"
    [error] = retry_errors(conn, queue_id)
    assert "env:DATABASE_URL is not an allowed secret name" in error
    assert worker_db not in error and "postgres" not in error.replace("env:DATABASE_URL", "")

    # a config value naming the environment: refused by name, the value shown nowhere
    conn.execute(
        "UPDATE call_service_providers SET api_key = 'sim-synthflow-key',"
        ' config = config || \'{"read_timeout": "env:SOME_TIMEOUT"}\' WHERE id = %s',
        (synthflow,),
    )
    result, queue_id = place_one(conn, seeded, "synthflow")
    [error] = retry_errors(conn, queue_id)
    assert "config.read_timeout" in error and "canary" not in error
    assert sim.stats()["total_creates"] == 0
