"""Fixtures for running the worker's code in this process against a real database."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from providers.simulator import Simulator
from tests.conftest import running_simulator
from tests.integration.dbutil import Conn, connect
from tests.integration.receiver import Receiver
from tests.sdk_strict import Recorder
from worker import runtime
from worker.seed import Seeded, seed_demo
from worker.settings import get_settings


@pytest.fixture
def conn(db_url: str) -> Iterator[Conn]:
    """A connection to the test's own database (the superuser; ``as_role`` narrows it)."""
    with connect(db_url) as c:
        yield c


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """The provider simulator on a free port (both APIs), stopped afterwards."""
    with running_simulator() as simulator:
        yield simulator


@pytest.fixture
def worker_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This process's worker runtime pointed at the test's database (settings rebuilt)."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    # the simulator is not an official provider host: allowed as ops allow it
    monkeypatch.setenv("CALLQ_PROVIDER_ALLOWED_HOSTS", "http://127.0.0.1:*")
    get_settings.cache_clear()
    runtime.reset()
    yield db_url
    runtime.reset()
    get_settings.cache_clear()


@pytest.fixture
def seeded(worker_db: str, sim: Simulator) -> Seeded:
    """A user, plan, template and the two providers, pointed at ``sim``."""
    with psycopg.connect(worker_db, autocommit=True) as conn:
        return seed_demo(conn, sim_base_url=sim.base_url)


@pytest.fixture
def rec() -> Recorder:
    """The raw responses an SDK client received (tests/sdk_strict.py)."""
    return Recorder()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """A webhook receiver for the simulator's signed deliveries."""
    r = Receiver()
    yield r
    r.close()
