"""Providers as configuration: ``callq providers`` from the command line, and the compose file's
own provider list driving a real fleet to the simulator (no Docker engine here: the same
commands and environment the compose services run, with the simulator's address swapped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from providers.simulator import Simulator
from tests.e2e.conftest import FAST_ENV, all_terminal, slots_held, status_counts
from worker.embedded import wait_until
from worker.fleet import Fleet
from worker.seed import schedule_calls

REPO = Path(__file__).resolve().parents[2]
COMPOSE_ENV = yaml.safe_load((REPO / "docker-compose.yml").read_text())["x-callq"]["environment"]


def callq(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CALLQ_")}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={**base, "PYTHONPATH": str(REPO), **env},
        input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


def _compose_env(sim: Simulator, db_url: str) -> dict[str, str]:
    env = {k: str(v) for k, v in COMPOSE_ENV.items() if k.startswith("CALLQ_SECRET_")}
    origin = COMPOSE_ENV["CALLQ_PROVIDER_ALLOWED_HOSTS"]
    env["CALLQ_PROVIDERS"] = COMPOSE_ENV["CALLQ_PROVIDERS"].replace(origin, sim.base_url)
    env["CALLQ_PROVIDER_ALLOWED_HOSTS"] = sim.base_url
    env["DATABASE_URL"] = db_url
    return env


def test_compose_providers_place_calls_end_to_end(
    db_url: str, conn: psycopg.Connection[Any], sim: Simulator, broker_url: str, tmp_path: Path
) -> None:
    env = _compose_env(sim, db_url)
    first = callq("providers", "sync", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["added provider Vapi (simulator)",
                                         "added provider SynthFlow (simulator)"]  # fmt: skip
    again = callq("providers", "sync", env=env)  # every deploy runs it: an upsert
    assert again.stdout.count("updated provider") == 2, again.stderr
    keys = conn.execute("SELECT api_key FROM call_service_providers ORDER BY priority").fetchall()
    assert keys == [("env:CALLQ_SECRET_VAPI_KEY",), ("env:CALLQ_SECRET_SYNTHFLOW_KEY",)]

    listed = callq("providers", "list", env=env)
    assert listed.returncode == 0 and "env:CALLQ_SECRET_VAPI_KEY" in listed.stdout
    assert "sim-vapi-key" not in listed.stdout + listed.stderr

    # a user and template only (the providers are the compose file's)
    from worker.seed import seed_demo

    seeded = seed_demo(conn, sim_base_url=sim.base_url, providers=())
    ids = schedule_calls(conn, seeded, 8)
    fleet_env = {**FAST_ENV, **{k: v for k, v in env.items() if k != "CALLQ_PROVIDERS"}}
    fleet = Fleet(env={**fleet_env, "CALLQ_BROKER_URL": broker_url}, log_dir=tmp_path / "logs")
    try:
        fleet.start_worker()
        fleet.start_beat()
        wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")
    finally:
        fleet.stop()
    assert status_counts(conn, ids) == {"completed": 8}
    assert slots_held(conn) == 0
    assert sim.stats()["total_creates"] == 8

    off = callq("providers", "disable", "Vapi (simulator)", env=env)
    assert off.returncode == 0, off.stderr
    assert conn.execute(
        "SELECT is_active FROM call_service_providers WHERE name = 'Vapi (simulator)'"
    ).fetchone() == (False,)


BAD = [
    ({"type": "nope"}, "unknown type"),
    ({"base_url": "https://evil.example.com/vapi"}, "not an official host"),
    ({"api_key": "env:DATABASE_URL"}, "may not read"),
    ({"api_key": "env:HOME"}, "may not read"),
    ({"priority": 0}, "priority"),
    ({"colour": "red"}, "unknown field"),
]


@pytest.mark.parametrize(("change", "says"), BAD)
def test_bad_provider_is_one_line_and_writes_nothing(
    db_url: str, conn: psycopg.Connection[Any], sim: Simulator, change: dict[str, Any], says: str
) -> None:
    env = _compose_env(sim, db_url)
    providers = json.loads(env["CALLQ_PROVIDERS"])
    providers[1].update(change)
    result = callq("providers", "sync", "-", env=env, stdin=json.dumps(providers))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert says in lines[0] and "sim-" not in lines[0]
    assert conn.execute("SELECT count(*) FROM call_service_providers").fetchone() == (0,)


def test_add_from_flags(db_url: str, conn: psycopg.Connection[Any], sim: Simulator) -> None:
    env = _compose_env(sim, db_url)
    result = callq(
        "providers", "add", "--name", "Vapi", "--type", "vapi",
        "--base-url", "https://api.vapi.ai", "--api-key", "env:CALLQ_SECRET_VAPI",
        "--max-calls", "5", "--priority", "1",
        "--config", '{"phone_number_id": "pn", "assistant_id": "as"}', env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = conn.execute(
        "SELECT p.max_concurrent_calls, l.available_slots FROM call_service_providers p"
        " JOIN provider_load l ON l.provider_id = p.id WHERE p.name = 'Vapi'"
    ).fetchone()
    assert row == (5, 5)
