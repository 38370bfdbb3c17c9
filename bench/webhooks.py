"""Webhook endpoint latency and rate: one keep-alive client against ``callq webhooks``.

    .venv/bin/python -m bench.webhooks [--requests 2000]

Starts a scratch database (seeded providers), a Redis of its own as the broker and the real
``callq webhooks`` process, then sends signed SynthFlow deliveries (accepted: one broker publish
each) and unsigned ones (401) one after another over one HTTP/1.1 keep-alive connection. Prints
p50/p99 latency (request written -> answer read, client side) and requests per second.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import os
import subprocess
import sys
import time

import psycopg

from bench.common import REPO, log, own_redis, percentile, scratch_db
from worker.embedded import free_port, wait_until
from worker.seed import seed_demo

SECRET = "bench-webhook-secret"


def _delivery(call_id: str, signed: bool) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"status": "completed", "call": {"call_id": call_id, "status": "completed"}})
    digest = hmac.new(SECRET.encode(), call_id.encode(), hashlib.sha256).digest()
    signature = base64.b64encode(digest).decode() if signed else "not-a-signature"
    return body.encode(), {"Synthflow-Signature": signature, "Content-Type": "application/json"}


def _run(port: int, path: str, count: int, signed: bool) -> tuple[list[float], float, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    for i in range(count):
        body, headers = _delivery(f"bench-{signed}-{i}", signed)
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        latencies.append((time.perf_counter() - t0) * 1000.0)
        statuses[response.status] = statuses.get(response.status, 0) + 1
    elapsed = time.perf_counter() - start
    conn.close()
    expected = 200 if signed else 401
    return latencies, count / elapsed, statuses.get(expected, 0)


def run(requests: int = 2000) -> dict[str, dict[str, float]]:
    """Start the stack, measure signed and unsigned deliveries, stop everything."""
    redis_server = own_redis()
    port = free_port()
    out: dict[str, dict[str, float]] = {}
    try:
        with scratch_db() as db:
            with psycopg.connect(db.url, autocommit=True) as conn:
                seeded = seed_demo(conn, sim_base_url="http://127.0.0.1:9", webhook_secret=SECRET)
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "DATABASE_URL": db.url,
                "CALLQ_BROKER_URL": redis_server.url,
                "CALLQ_PROVIDER_ALLOWED_HOSTS": "http://127.0.0.1:9",
                "CALLQ_LOG_LEVEL": "WARNING",
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "webhooks", "--port", str(port)],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
            )
            try:
                path = f"/webhooks/{seeded.provider_ids['synthflow']}"
                wait_until(lambda: _healthy(port), timeout=30, what="the webhook server")
                _run(port, path, 200, True)  # warm up
                for signed in (True, False):
                    lat, rate, ok = _run(port, path, requests, signed)
                    kind = "signed" if signed else "unsigned"
                    out[kind] = {
                        "p50_ms": percentile(lat, 50),
                        "p99_ms": percentile(lat, 99),
                        "rps": rate,
                        "as_expected": ok / requests,
                    }
                    log(f"webhooks: {kind}: {out[kind]}")
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    finally:
        redis_server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    run(parser.parse_args(argv).requests)
    return 0


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
