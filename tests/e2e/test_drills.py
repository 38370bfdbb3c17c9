"""CI-sized fault drills (``bench.drills`` with small batches): real worker and beat processes,
a Redis of the drill's own, the simulator, and a scratch database on the test server.

Each asserts the drill's zero counts (nothing lost, nobody dialed twice, no slot held), never a
timing. The long variants: ``.venv/bin/python -m bench.drills``.
"""

from __future__ import annotations

import os
import pwd

import pytest

from bench import drills
from bench.common import PG_BIN

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


@pytest.fixture
def cfg(pg_admin_url: str) -> drills.DrillConfig:
    return drills.DrillConfig(calls=20, settle_timeout=60, admin_url=pg_admin_url)


def _assert_clean(r: drills.DrillResult) -> None:
    detail = (
        f"{r.name}: error={r.error} by_status={r.by_status} notes={r.notes} "
        f"extra={ {k: v for k, v in r.extra.items() if k != 'logs_tail'} }\n"
        f"{r.extra.get('logs_tail', '')[-4000:]}"
    )
    assert r.error is None, detail
    assert r.scheduled > 0, detail
    assert r.lost == 0, detail
    assert r.dialed_more_than_once == 0, detail
    assert r.slots_held == 0, detail
    assert r.terminal == r.scheduled, detail


@pytest.mark.parametrize(
    "name",
    [
        "worker_sigkill",
        "redis_restart",
        # long variants (scripts/test -m slow; bench.drills runs every drill): a supervised
        # restart of what redis_restart covers, and 429s, which the adapters' contract tests
        # and the policy's unit tests cover without a fleet
        pytest.param("redis_restart_supervised", marks=pytest.mark.slow),
        "two_beats",
        "duplicate_task",
        pytest.param("provider_429", marks=pytest.mark.slow),
    ],
)
def test_drill_loses_nothing_and_dials_once(name: str, cfg: drills.DrillConfig) -> None:
    _assert_clean(drills.DRILLS[name](cfg))


def test_drill_provider_down_then_back(cfg: drills.DrillConfig) -> None:
    _assert_clean(drills.provider_down(cfg))


def _can_run_own_postgres() -> bool:
    if not (PG_BIN / "initdb").exists():
        return False
    if os.geteuid() != 0:
        return True
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return True


@pytest.mark.skipif(
    # in CI the binaries must be there: a missing one fails the run instead of skipping
    not _can_run_own_postgres() and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
    reason="needs PostgreSQL server binaries (and, as root, a postgres OS user)",
)
def test_drill_postgres_restart(cfg: drills.DrillConfig) -> None:
    cfg.admin_url = None  # the drill starts and crashes a PostgreSQL of its own
    _assert_clean(drills.postgres_restart(cfg))
