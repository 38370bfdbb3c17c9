"""A lone call's claim, create and record in this process: worker CPU per call, by spacing.

``.venv/bin/python -m bench.lone [--calls N]``. The tracking section's trickle ratio compares a
worker's CPU per call when calls trickle in (``RATE`` a second, each claimed, created and
recorded alone after about 125 ms of quiet) with calls that come together (claimed in
batches). Two things make up the difference: the work a lone call does that a batch shares (a
claim statement and a record statement per call instead of per batch), and what the machine
charges a process for waking from idle (cold caches, a core clocked down or handed to another
guest). This runs the same code both ways, so the two can be told apart: ``callq.poll`` in this
process (claim and gate, the create at the simulator, the record of the placed call) against a
scratch database, one call due at a time,

    back to back    the next call is scheduled as soon as the last one is placed
    10 ms apart     after 10 ms of quiet
    125 ms apart    after the trickle's 125 ms of quiet
    batch of 50     50 calls due at once, the together run's case

Figures: CPU ms per call of this process while ``callq.poll`` runs (scheduling is outside the
window), of it the kernel's (system time: sockets, waking the threads and processes a call
talks to), and the claim, the create and the record (each timed on its own thread). The
modes take turns, twice, so a drift of the machine falls on all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.common import fleet_env, log
from bench.stack import Stack

BATCH = 50
GAPS = {"back_to_back": 0.0, "10ms_apart": 0.010, "125ms_apart": 0.125}
PARTS = {"claim": "claim_and_gate", "record": "mark_placed"}


class Meter:
    """Per-part thread CPU of the wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.thread_time() - t0

        return timed


def _instrument(meter: Meter) -> Callable[[], object]:
    """Wrap the parts; return ``callq.poll``'s body (imported once the settings are set)."""
    from models.queries import Database
    from worker import logs, tasks

    logs.configure_logging("WARNING", True)
    for part, method in PARTS.items():
        setattr(Database, method, meter.wrap(part, getattr(Database, method)))
    tasks._create = meter.wrap("create", tasks._create)
    return tasks.poll.run  # type: ignore[no-any-return]


def _cpu() -> tuple[float, float]:
    """This process's (all, system) CPU seconds so far: the total exact, the kernel's share as
    the kernel estimates it."""
    return time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _mode(
    stack: Stack, poll: Callable[[], object], mode: str, calls: int, first: int
) -> tuple[float, float]:
    """(all, system) CPU seconds of this process inside ``poll`` for ``calls`` calls placed in
    ``mode``."""
    total = system = 0.0

    def timed_poll() -> None:
        nonlocal total, system
        t0, s0 = _cpu()
        poll()
        t1, s1 = _cpu()
        total, system = total + t1 - t0, system + s1 - s0

    if mode == "batch_of_50":
        for start in range(0, calls, BATCH):
            stack.schedule(BATCH, start=first + start)
            time.sleep(GAPS["125ms_apart"])  # a window's spacing, not a wait for a condition
            timed_poll()
        return total, system
    with stack.connect() as conn:
        for i in range(calls):
            stack.schedule_one(conn, first + i)
            time.sleep(GAPS[mode])  # the quiet being measured, not a wait for a condition
            timed_poll()
    return total, system


def measure(calls: int) -> dict[str, Any]:
    """Every mode, twice in turn, on a scratch stack of its own; ms per call."""
    from bench.tracking import _sim_config

    half = max(BATCH, calls // 2 // BATCH * BATCH)  # per turn: whole batches
    calls = 2 * half
    sim = _sim_config() | {"call_seconds": 3600}  # placed calls stay placed: no tracking here
    modes = [*GAPS, "batch_of_50"]
    stack = Stack(sim_config=sim, max_concurrent_calls=4 * len(modes) * calls).start()
    try:
        os.environ.update(fleet_env(stack.url, stack.redis.url))
        meter = Meter()
        poll = _instrument(meter)
        _mode(stack, poll, "back_to_back", 20, 10_000_000)  # connections, plans, caches
        total, system = dict.fromkeys(modes, 0.0), dict.fromkeys(modes, 0.0)
        parts: dict[str, dict[str, float]] = {m: {} for m in modes}
        first = 0
        for _ in range(2):
            for mode in modes:
                meter.seconds.clear()
                t, k = _mode(stack, poll, mode, half, first)
                total[mode], system[mode] = total[mode] + t, system[mode] + k
                for part, seconds in meter.seconds.items():
                    parts[mode][part] = parts[mode].get(part, 0.0) + seconds
                first += half
    finally:
        stack.stop()
    out = {
        mode: {
            "cpu_ms_per_call": total[mode] / calls * 1000,
            "system_ms_per_call": system[mode] / calls * 1000,
            **{f"{p}_ms": parts[mode].get(p, 0.0) / calls * 1000 for p in (*PARTS, "create")},
        }
        for mode in modes
    }
    log(f"lone: {out}")
    return out


def run(*, quick: bool = False) -> dict[str, Any]:
    """``measure`` in a process of its own (it sets the worker's settings in its environment)."""
    calls = 200 if quick else 400
    proc = subprocess.run(
        [sys.executable, "-m", "bench.lone", "--calls", str(calls)],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per mode (whole batches)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.calls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
