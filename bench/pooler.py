"""End to end through a transaction pooler beside a direct connection, in the same run.

    .venv/bin/python -m bench.pooler [--quick]

Three stacks, one after the other, each with its own scratch database, Redis, simulator, worker
and beat (bench/stack.py); the only difference is how the fleet reaches PostgreSQL:

    direct        the server's own port (LISTEN on)
    pooler        a pgbouncer of ours in transaction mode (what Supabase's port 6543 is),
                  LISTEN over the direct URL (CALLQ_LISTEN_DATABASE_URL)
    pooler, poll  the same pgbouncer, no direct URL: LISTEN off, beat's 1 s tick claims

Each stack is warmed up with one call, then ``count`` calls are scheduled in one transaction;
the figure is calls per second from that commit to the last create request at the simulator
(bench/e2e.py's ``ours_rate``), ``rounds`` times per stack (the median is reported).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from bench.common import log
from bench.e2e import ours_rate
from bench.stack import Stack

VARIANTS = {
    "direct": {"pooler": False},
    "pooler": {"pooler": True, "listen_direct": True},
    "pooler_poll": {"pooler": True, "listen_direct": False},
}


def _measure(name: str, options: dict[str, Any], count: int, rounds: int) -> dict[str, Any]:
    stack = Stack(max_concurrent_calls=2 * count, **options)
    stack.start()
    try:
        stack.fleet.start_worker("worker")
        stack.fleet.start_beat("beat")
        stack.warm_up()
        rates = []
        for r in range(rounds):
            got = ours_rate(stack, count, start=r * count)
            ids = got.pop("ids")
            settled, _ = stack.wait_settled(ids, 180)
            if not settled or got["arrived"] < count:
                raise RuntimeError(f"{name}: not every call placed and settled: {got}")
            rates.append(got["rate"])
            log(f"pooler: {name:12s} round {r + 1}: {got['rate']:.0f} calls/s")
        counts = stack.counts()
    finally:
        stack.stop()
    return {
        "rate": statistics.median(rates),
        "rates": rates,
        "lost": counts.get("lost"),
        "dialed_twice": counts.get("dialed_twice"),
    }


def run(*, quick: bool = False) -> dict[str, Any]:
    """Median calls/s per variant, and each pooled one's ratio to direct."""
    count, rounds = (300, 2) if quick else (1000, 3)
    out: dict[str, Any] = {"count": count, "rounds": rounds}
    for name, options in VARIANTS.items():
        out[name] = _measure(name, options, count, rounds)
    for name in ("pooler", "pooler_poll"):
        out[name]["ratio"] = out[name]["rate"] / out["direct"]["rate"]
    out["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return out


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
