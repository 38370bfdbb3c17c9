"""The README's run command: ``callq demo`` ends with every call terminal and no slot held."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
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
    assert "scheduled 12 calls" in out and "2 where it is night now" in out
    assert "provider slots still held: 0" in out
    summary = out.split("Summary", 1)[1].splitlines()[3:]
    calls = sum(
        int(line.split()[-4]) for line in summary if line.split()[:1] in (["completed"], ["failed"])
    )
    assert calls == 10  # every call but the two the calling window holds
    queued = [line.split() for line in summary if line.split()[:1] == ["queued"]]
    assert [int(row[-4]) for row in queued] == [2] and [row[-3] for row in queued] == ["0"]
    held = re.search(
        r"held by a calling rule: 2 calls \(calling_window\) until (\d\d):(\d\d) ",
        out,
    )
    assert held, out[-2000:]
    assert held.group(1, 2) == ("08", "00")  # the window's local opening
    assert "+1555" not in out
    # held, not dialed: queued with no attempt, due later, each with a 'held' event
    with psycopg.connect(empty_db_url) as conn:
        rows = conn.execute(
            "SELECT q.status, q.hold_reason, q.attempts, q.scheduled_time > now(),"
            " (SELECT count(*) FROM call_events e WHERE e.queue_id = q.id AND e.kind = 'held'),"
            " (SELECT count(*) FROM call_events e WHERE e.queue_id = q.id AND e.kind = 'dialing')"
            " FROM call_queue q WHERE q.hold_reason IS NOT NULL"
        ).fetchall()
    assert len(rows) == 2
    for status, reason, attempts, later, held_events, dialing_events in rows:
        assert (status, reason, attempts, later) == ("queued", "calling_window", 0, True)
        assert held_events >= 1 and dialing_events == 0


def test_demo_keep_serves_flower_and_metrics_until_ctrl_c(
    empty_db_url: str, redis_url: str
) -> None:
    import signal
    import urllib.request

    from worker.embedded import wait_until

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": empty_db_url,
        "CALLQ_BROKER_URL": redis_url.rsplit("/", 1)[0] + "/6",
        # a demo that does not stop is sent SIGABRT: every thread's stack goes to its output
        "PYTHONFAULTHANDLER": "1",
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
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # the stacks of its threads, then it dies
            try:
                rest, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                rest, _ = proc.communicate(timeout=10)
            pytest.fail(
                f"the demo did not stop on Ctrl-C; its output after the banner:\n{rest[-6000:]}"
            )
        assert code == 0, proc.stdout.read()[-3000:]
        assert get(metrics.group(1)) == ""  # stopped with the demo
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
