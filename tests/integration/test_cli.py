"""The ``callq`` command line against a real database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from worker.seed import schedule_calls, seed_demo

REPO = Path(__file__).resolve().parents[2]


def callq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for var in ("DATABASE_URL", "CALLQ_DATABASE_URL"):
        if env is None or var not in env:
            full_env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_db_upgrade_applies_once_then_nothing(empty_db_url: str) -> None:
    first = callq("db", "upgrade", env={"DATABASE_URL": empty_db_url})
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout and "applied 0" not in first.stdout
    second = callq("db", "upgrade", env={"DATABASE_URL": empty_db_url})
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "applied 0 migration(s)"


def test_missing_database_url_is_one_readable_line() -> None:
    result = callq("queue", env={})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "callq: error: DATABASE_URL (or CALLQ_DATABASE_URL) is not set"
    ]


def test_unreachable_database_is_one_readable_line() -> None:
    url = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
    result = callq("queue", env={"DATABASE_URL": url})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("callq: database error:")


def test_queue_shows_counts_and_providers(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        seeded = seed_demo(conn, sim_base_url="http://127.0.0.1:9")
        schedule_calls(conn, seeded, 3)
        schedule_calls(conn, seeded, 2, delay_seconds=3600, start=10)
    result = callq("queue", env={"DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Queue by status" in out
    assert ["queued", "5"] in [line.split() for line in out.splitlines()]
    assert "Vapi (simulator)" in out and "Synthflow (simulator)" in out
    assert "+1555" not in out  # no phone numbers on screen


def test_campaigns_shows_each_campaigns_progress(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        seeded = seed_demo(conn, sim_base_url="http://127.0.0.1:9")
        camp = conn.execute(
            "SELECT create_campaign(%s, %s, 'Spring renewals', 'draft')",
            (seeded.user_id, seeded.template_id),
        ).fetchone()
        assert camp is not None
        conn.execute(
            'SELECT count(*) FROM schedule_calls(%s, \'[{"name": "Ann", "phone":'
            ' "+15551230001"}, {"name": "Bo", "phone": "+15551230002"}]\')',
            (camp[0],),
        )
    result = callq("campaigns", env={"DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["campaign", "name", "status", "calls"]
    row = next(line for line in lines if str(camp[0]) in line)
    assert "Spring renewals" in row and row.split()[3:6] == ["draft", "2", "2"]
    assert "+1555" not in result.stdout and "Ann" not in result.stdout


@pytest.mark.parametrize("args", [["nonsense"], ["db", "upgrade", "--bogus"]])
def test_bad_arguments_exit_non_zero(args: list[str]) -> None:
    result = callq(*args)
    assert result.returncode != 0
    assert "usage:" in result.stderr
