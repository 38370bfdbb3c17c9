"""Where the CPU of one burst goes: seconds of CPU per call for each process of the stack.

``.venv/bin/python -m bench.cpu_split [--calls N]``: starts the same stack as ``bench.e2e``
(scratch database, own Redis, simulator answering at once, one worker and one beat), schedules
a burst, waits until every call is placed and settled, and prints the CPU time each process
(and all PostgreSQL backends together) spent per call. On a 2-core machine the sum is the
budget: calls/s can never exceed 2 / (CPU seconds per call).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import psutil

from bench.common import log
from bench.stack import Stack


def _cpu(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds (user + system) per name: its processes and their descendants, each process
    counted once (the postmaster and its backends are listed together, and each backend is also
    the postmaster's child)."""
    out: dict[str, float] = {}
    for name, plist in procs.items():
        members: dict[int, psutil.Process] = {}
        for p in plist:
            try:
                members.setdefault(p.pid, p)
                for c in p.children(recursive=True):
                    members.setdefault(c.pid, c)
            except psutil.NoSuchProcess:
                pass
        total = 0.0
        for proc in members.values():
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        out[name] = total
    return out


def _postgres() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name", "username"]) if p.info["name"] == "postgres"]


def run(calls: int = 2000) -> dict[str, Any]:
    stack = Stack(max_concurrent_calls=2 * calls)
    stack.start()
    try:
        worker = stack.fleet.start_worker("worker")
        beat = stack.fleet.start_beat("beat")
        stack.warm_up()
        assert stack.sim is not None and stack.redis is not None
        procs = {
            "worker": [psutil.Process(worker.pid)],
            "beat": [psutil.Process(beat.pid)],
            "simulator": [psutil.Process(stack.sim.proc.pid)],
            "redis": [psutil.Process(stack.redis._proc.pid)],
            "postgres (all backends)": _postgres(),
            "this process (scheduling)": [psutil.Process()],
        }
        before = _cpu(procs)
        t0 = time.monotonic()
        ids = stack.schedule(calls)
        ok, _ = stack.wait_settled(ids, 300)
        elapsed = time.monotonic() - t0
        procs["postgres (all backends)"] = _postgres()
        after = _cpu(procs)
        per_call = {k: (after[k] - before.get(k, 0.0)) / calls * 1000 for k in after}
        return {"calls": calls, "settled": ok, "seconds": elapsed, "cpu_ms_per_call": per_call}
    finally:
        stack.stop()


if __name__ == "__main__":
    n = int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 2000
    result = run(n)
    secs = result["seconds"]
    log(f"cpu_split: {result['calls']} calls settled={result['settled']} in {secs:.1f}s")
    total = 0.0
    for name, ms in sorted(result["cpu_ms_per_call"].items(), key=lambda kv: -kv[1]):
        total += ms
        print(f"{name:28s} {ms:6.2f} ms CPU per call")
    bound = 2000 / total
    print(f"{'total':28s} {total:6.2f} ms CPU per call -> at most {bound:.0f} calls/s on 2 cores")
