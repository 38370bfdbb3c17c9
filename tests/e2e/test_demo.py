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


def test_demo_keep_serves_flower_and_metrics_until_ctrl_c(
    empty_db_url: str, redis_url: str
) -> None:
    import re
    import signal
    import urllib.request

    from worker.embedded import wait_until

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": empty_db_url,
        "CALLQ_BROKER_URL": redis_url.rsplit("/", 1)[0] + "/6",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "demo", "--calls", "3", "--keep"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "queue:" in line:
                break
        text = "".join(lines)
        assert "Ctrl-C stops it" in text, text[-3000:]
        flower = re.search(r"Flower:\s+(http://\S+)", text)
        metrics = re.search(r"metrics:\s+(http://\S+)", text)
        assert flower and metrics and "callq queue" in text

        def get(url: str) -> str:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
                    return str(resp.read().decode())
            except OSError:
                return ""

        assert "callq_queue_calls" in wait_until(
            lambda: get(metrics.group(1)), timeout=60, what="the metrics endpoint"
        )
        assert wait_until(lambda: get(flower.group(1)), timeout=60, what="Flower")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert get(metrics.group(1)) == ""  # stopped with the demo
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
