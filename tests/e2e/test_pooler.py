"""The fleet behind a real transaction pooler: Debian's pgbouncer in transaction mode, started by
the test on its own port, stopped after.

Every process (worker, beat, the migration runner) talks to the database only through
pgbouncer; LISTEN is off (no direct URL), so beat's tick claims the calls. Without
``prepare_threshold=None`` psycopg would prepare statements on whichever server session ran
them and fail with ``prepared statement "_pg3_N" does not exist`` after five executions; a
retry's backoff comes from ``ops_settings``, not from session state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench.common import OwnPgbouncer
from models.migrate import upgrade
from models.session import connect
from providers.simulator import Simulator
from tests.e2e.conftest import (
    FAST_ENV,
    all_terminal,
    creates_by_queue,
    slots_held,
    status_counts,
)
from worker.embedded import wait_until
from worker.fleet import Fleet
from worker.seed import schedule_calls, seed_demo

pytestmark = pytest.mark.e2e


@pytest.fixture
def pgbouncer(pg_admin_url: str) -> Iterator[OwnPgbouncer]:
    bouncer = OwnPgbouncer(pg_admin_url, pool_size=10).start()
    yield bouncer
    bouncer.stop()


def test_fleet_through_pgbouncer_transaction_mode(
    empty_db_url: str,
    pgbouncer: OwnPgbouncer,
    sim: Simulator,
    broker_url: str,
    tmp_path: Path,
) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(empty_db_url)["dbname"]
    pooled = pgbouncer.url(str(dbname))
    assert upgrade(pooled)  # the migration runner through the pooler, too
    with connect(pooled, autocommit=True) as conn:
        conn.execute("UPDATE ops_settings SET retry_delay_scale = 0.002")
        seeded = seed_demo(conn, sim_base_url=sim.base_url, max_concurrent_calls=10)
        sim.configure({"outcomes_by_suffix": {"9001": "busy"}})
        ids = schedule_calls(conn, seeded, 40) + schedule_calls(
            conn, seeded, 4, suffix="9001", start=100
        )
        fleet = Fleet(
            env={"DATABASE_URL": pooled, "CALLQ_BROKER_URL": broker_url, **FAST_ENV},
            log_dir=tmp_path / "logs",
        )
        try:
            fleet.start_worker()
            fleet.start_beat()
            wait_until(lambda: all_terminal(conn, ids), timeout=150, what="every call terminal")
        finally:
            fleet.stop()
        counts = status_counts(conn, ids)
        assert counts == {"completed": 40, "failed": 4}, counts
        assert slots_held(conn) == 0
        attempts = conn.execute(
            "SELECT min(attempts), max(attempts) FROM call_queue WHERE id = ANY(%s)"
            " AND status = 'failed'",
            (ids[40:],),
        ).fetchone()
        assert attempts == (3, 3)  # retried through handle_failed_call's backoff
    creates = creates_by_queue(sim)
    assert [creates.get(str(i)) for i in ids] == [1] * 40 + [3] * 4  # never dialed twice
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    for bad in ("prepared statement", "Traceback", "listener.started"):
        assert bad not in logs, bad
    assert "listener.off" in logs  # no direct URL: LISTEN is off, the tick claims
    assert f"db={dbname}" in pgbouncer.log()
