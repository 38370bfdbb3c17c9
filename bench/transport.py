"""The adapters' HTTP transport: client CPU per request, httpx's default transport vs ours.

    .venv/bin/python -m bench.transport [--requests 2000] [--threads 16] [--rounds 3]

Starts the simulator as a child process, then sends Vapi creates through the adapter
(``VapiProvider.create_call``, the worker's code) over each transport in alternating rounds:
one thread in a loop, then ``--threads`` threads at once (the worker's lanes). Prints the CPU
of this process per request (user + system; the simulator's CPU is its own process's) and the
requests per second, median of the rounds. Speed only: tests/integration/test_transport.py
checks the behaviour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.common import Simulator, log
from providers._transport import new_client
from providers.base import CallRequest, ProviderConfig
from providers.vapi import VapiProvider

TRANSPORTS: dict[str, Callable[[], httpx.Client]] = {
    "httpx default (httpcore pool)": lambda: httpx.Client(http2=False),
    "thread-local (callq)": new_client,
}


def _provider(base_url: str, client: httpx.Client) -> VapiProvider:
    config = ProviderConfig.model_validate(
        {
            "id": "bench-vapi",
            "provider_type": "vapi",
            "api_key": "sim-vapi-key",
            "base_url": f"{base_url}/vapi",
            "config": {"phone_number_id": "pn-bench", "assistant_id": "as-bench"},
        }
    )
    return VapiProvider(config, client)


def _request() -> CallRequest:
    return CallRequest(
        correlation_id="bench", to_number="+14155550100", recipient_name="Bench", script="hi"
    )


def _round(provider: VapiProvider, requests: int, threads: int) -> tuple[float, float]:
    """CPU ms of this process per request, and requests per second, over ``threads`` threads."""
    each = requests // threads
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(each):
            provider.create_call(_request())

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    barrier.wait()
    for t in pool:
        t.join()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return cpu / (each * threads) * 1000, each * threads / wall


def run(requests: int = 2000, threads: int = 16, rounds: int = 3) -> dict[str, Any]:
    sim = Simulator()
    sim.start()
    out: dict[str, Any] = {}
    try:
        samples: dict[str, dict[int, list[tuple[float, float]]]] = {
            name: {1: [], threads: []} for name in TRANSPORTS
        }
        for r in range(rounds):
            for name, make in TRANSPORTS.items():
                with make() as client:
                    provider = _provider(sim.base_url, client)
                    provider.create_call(_request())  # connect outside the timing
                    for n in (1, threads):
                        samples[name][n].append(_round(provider, requests, n))
                log(f"transport: round {r + 1} {name} done")
        for name, by_threads in samples.items():
            out[name] = {
                f"{n} thread{'s' * (n > 1)}": {
                    "cpu_ms_per_request": statistics.median(s[0] for s in got),
                    "requests_per_second": statistics.median(s[1] for s in got),
                }
                for n, got in by_threads.items()
            }
    finally:
        sim.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    ns = parser.parse_args(argv)
    res = run(ns.requests, ns.threads, ns.rounds)
    for name, rows in res.items():
        for label, row in rows.items():
            log(
                f"transport: {name}, {label}: {row['cpu_ms_per_request']:.3f} ms CPU per "
                f"request, {row['requests_per_second']:.0f} req/s"
            )
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
