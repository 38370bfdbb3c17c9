"""The README's run command: ``callq demo`` ends with every call terminal and no slot held."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_every_call_to_a_terminal_state(empty_db_url: str, redis_url: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": empty_db_url,
        "CALLQ_BROKER_URL": redis_url.rsplit("/", 1)[0] + "/6",
    }
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--calls", "12", "--timeout", "150"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "scheduled 12 calls" in out
    assert "provider slots still held: 0" in out
    summary = out.split("Summary", 1)[1].splitlines()[3:]
    calls = sum(
        int(line.split()[-4]) for line in summary if line.split()[:1] in (["completed"], ["failed"])
    )
    assert calls == 12
    assert "+1555" not in out
