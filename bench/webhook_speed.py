"""The webhook endpoint from one keep-alive client: latency per request and requests per second.

``.venv/bin/python -m bench.webhook_speed [--quick]``: a scratch database with the demo
providers (a webhook secret set), ``callq webhooks`` on a port of its own, and one
``httpx.Client`` (one keep-alive connection) sending, one after another, health checks and
authenticated Vapi status-updates (accepted; they change nothing, so the database and the broker
stay out of the figure). Targets: p50 under 5 ms, at least 500 requests per second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import psycopg

from bench.common import REPO, ScratchDB, log, percentile
from worker.embedded import free_port, wait_for_port
from worker.seed import seed_demo

SECRET = "bench-webhook-secret"


def _status_update() -> bytes:
    call = {"id": "call-bench", "orgId": "org", "status": "in-progress"}
    message = {"type": "status-update", "status": "in-progress", "call": call}
    return json.dumps({"message": message}).encode()


def _timed(client: httpx.Client, count: int, send: Any) -> dict[str, float]:
    times = []
    t0 = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        response = send(client)
        times.append((time.perf_counter() - t) * 1000)
        assert response.status_code == 200, response.status_code
    seconds = time.perf_counter() - t0
    return {
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "rps": count / seconds,
    }


def run(*, quick: bool = False) -> dict[str, Any]:
    """Start the server, measure both kinds of request, stop everything."""
    count = 500 if quick else 3000
    db = ScratchDB()
    db.create()
    port = free_port()
    proc = None
    try:
        with psycopg.connect(db.url, autocommit=True) as conn:
            seeded = seed_demo(conn, sim_base_url="http://127.0.0.1:9", webhook_secret=SECRET)
        env = {**os.environ, "DATABASE_URL": db.url, "PYTHONPATH": str(REPO)}
        cli = [sys.executable, "-m", "worker.cli", "webhooks", "--port", str(port)]
        proc = subprocess.Popen(cli, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        wait_for_port(port, 30)
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/webhooks/{seeded.provider_ids['vapi']}"
        body, headers = _status_update(), {"X-Vapi-Secret": SECRET}
        with httpx.Client(timeout=10) as client:
            client.get(f"{base}/healthz")
            client.post(url, content=body, headers=headers)  # warm: provider directory loaded
            out = {
                "health": _timed(client, count, lambda c: c.get(f"{base}/healthz")),
                "status_update": _timed(
                    client, count, lambda c: c.post(url, content=body, headers=headers)
                ),
            }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=15)
        db.drop()
    log(f"webhooks: {out}")
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
