"""Long calls: provider reads per call, how late history learns a call's end, worker CPU per call.

``.venv/bin/python -m bench.tracking [--quick]``. Four runs, each on a stack of its own (scratch
database, own Redis, simulator, one worker, one beat), every call answered and lasting
``CALL_SECONDS``, the worker on its default tracking settings:

    polling, together    all calls scheduled in one transaction; no webhooks
    polling, trickle     calls scheduled one by one, ``RATE`` per second
    webhooks, together   the simulator posts Vapi's webhooks to ``callq webhooks``
    webhooks, trickle

Figures per run: provider reads per call (the simulator's count of single-call GETs), history
lag (``call_history.created_at - ended_at``, the provider's end time; p50 and p99) and worker
CPU per call (the worker and its children, from the first schedule to the last history row).

Then ``bench.lone``: a lone call's claim, create and record in process, back to back, 10 ms and
125 ms apart and in a batch of 50, which tells the trickle's extra CPU that is the lone call's
own work from what the machine charges for waking from idle.

Informative beside the CPU figure: the worker's idle CPU per second (measured over
``IDLE_SECONDS`` before the first schedule, beat's ticks running), the run's length, and the
CPU per call net of that idle rate over the run. A trickle run lasts ``calls / RATE`` seconds
longer than a together run and pays the idle rate over them; the net figure is the work the
calls themselves cost.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import psutil

from bench import lone
from bench.common import log, percentile
from bench.cpu_split import _cpu
from bench.stack import Stack
from worker.embedded import free_port, wait_for_port
from worker.settings import Settings

CALL_SECONDS = 60.0
RATE = 8.0  # calls per second when they trickle in
WEBHOOK_SECRET = "sim-webhook-secret"  # the simulator signs with this by default
PROBE_SUFFIX = "9999"  # numbers ending so fail at once, for good (the readiness probe)
IDLE_SECONDS = 10.0  # the idle worker's CPU is measured over this long before a run


@dataclass(frozen=True)
class Run:
    """One scenario: webhooks on or off, calls together or trickling in."""

    webhooks: bool
    trickle: bool

    @property
    def name(self) -> str:
        source = "webhooks" if self.webhooks else "polling"
        return f"{source}_{'trickle' if self.trickle else 'together'}"


def _tracking_env() -> dict[str, str]:
    """The product's own tracking defaults (the benchmark stack shortens them otherwise)."""
    fields = Settings.model_fields
    names = ("track_initial_delay_seconds", "track_max_delay_seconds", "track_backoff_factor")
    return {f"CALLQ_{n.upper()}": str(fields[n].default) for n in names} | {
        "CALLQ_LEASE_SECONDS": str(fields["lease_seconds"].default)
    }


def _sim_config() -> dict[str, Any]:
    return {
        "seed": 7,
        "outcome_mix": {"completed": 1.0},
        "queue_seconds": 0.1,
        "ring_seconds": 0.5,
        "call_seconds": CALL_SECONDS,
        "outcomes_by_suffix": {PROBE_SUFFIX: "failed_permanent"},
        "record_times": True,
    }


def _start(run: Run, calls: int) -> tuple[Stack, psutil.Process]:
    env = _tracking_env()
    port = free_port()
    if run.webhooks:
        env["CALLQ_WEBHOOK_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
    stack = Stack(
        sim_config=_sim_config(),
        env_overrides=env,
        max_concurrent_calls=2 * calls,
        webhook_secret=WEBHOOK_SECRET if run.webhooks else None,
    ).start()
    try:
        worker = stack.fleet.start_worker("worker")
        stack.fleet.start_beat("beat")
        if run.webhooks:
            cli = [sys.executable, "-m", "worker.cli", "webhooks", "--port", str(port)]
            stack.fleet.start("webhooks", cli)
            wait_for_port(port, 30)
        stack.warm_up(suffix=PROBE_SUFFIX)
    except BaseException:
        stack.stop()
        raise
    return stack, psutil.Process(worker.pid)


def _schedule(stack: Stack, run: Run, calls: int) -> list[Any]:
    if not run.trickle:
        return stack.schedule(calls)
    ids = []
    t0 = time.monotonic()
    with stack.connect() as conn:
        for i in range(calls):
            wait = t0 + i / RATE - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            ids.append(stack.schedule_one(conn, i)[0])
    return ids


def _lags(stack: Stack, ids: list[Any]) -> list[float]:
    with stack.connect() as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM created_at - ended_at) FROM call_history"
            " WHERE queue_id = ANY(%s::uuid[])",
            ([str(i) for i in ids],),
        ).fetchall()
    return [float(r[0]) for r in rows]


def measure(run: Run, calls: int) -> dict[str, Any]:
    """One scenario on a fresh stack; the figures of the module docstring."""
    stack, worker = _start(run, calls)
    try:
        assert stack.sim is not None
        idle0 = _cpu({"worker": [worker]})["worker"]
        time.sleep(IDLE_SECONDS)  # a measuring window, not a wait for a condition
        reads0 = stack.sim.stats()["counters"].get("call_reads_vapi", 0)
        cpu0 = _cpu({"worker": [worker]})["worker"]
        idle_rate = (cpu0 - idle0) / IDLE_SECONDS
        t0 = time.monotonic()
        ids = _schedule(stack, run, calls)
        settled, _ = stack.wait_settled(ids, CALL_SECONDS + calls / RATE + 180)
        cpu = _cpu({"worker": [worker]})["worker"] - cpu0
        seconds = time.monotonic() - t0
        reads = stack.sim.stats()["counters"].get("call_reads_vapi", 0) - reads0
        lags = _lags(stack, ids)
    finally:
        stack.stop()
    out = {
        "calls": calls,
        "settled": settled,
        "reads_per_call": reads / calls,
        "lag_p50_s": percentile(lags, 50),
        "lag_p99_s": percentile(lags, 99),
        "cpu_ms_per_call": cpu / calls * 1000,
        "seconds": seconds,
        "idle_cpu_ms_per_s": idle_rate * 1000,
        "cpu_ms_per_call_net_of_idle": (cpu - idle_rate * seconds) / calls * 1000,
    }
    log(f"tracking: {run.name}: {out}")
    return out


def run(*, quick: bool = False) -> dict[str, Any]:
    """Every scenario; a JSON-able dict keyed by scenario name."""
    calls = 100 if quick else 1000
    results: dict[str, Any] = {"call_seconds": CALL_SECONDS, "trickle_rate": RATE}
    for webhooks in (False, True):
        for trickle in (False, True):
            scenario = Run(webhooks, trickle)
            results[scenario.name] = measure(scenario, calls)
    # what of the trickle's extra CPU is the machine waking from idle (bench/lone.py)
    results["lone"] = lone.run(quick=quick)
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
