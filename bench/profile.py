"""Where the worker's time goes while it places a burst of calls (py-spy, if installed).

    .venv/bin/python -m bench.profile [--calls 2000] [--seconds 10]

Starts a stack like ``bench.e2e`` (simulator answering at once), schedules a burst of calls due
now, samples the worker process with ``py-spy record --format raw`` while it works through them,
and prints the functions holding the most samples (inclusive and self), plus the Celery task
mix. py-spy is a development tool (``pip install py-spy``); it is not a project dependency.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import log
from bench.stack import Stack


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def summarize(raw: Path, top: int = 60) -> dict[str, Any]:
    """Inclusive and self sample shares per function from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        n = int(count_s)
        total += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
            if " (" in f
            else f
            for f in stack.split(";")
        ]
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / max(total, 1), 1)) for k, v in c.most_common(top)]

    return {
        "samples": total,
        "inclusive_pct": pct(inclusive),
        "self_pct": pct(own),
        "by_task": _by_task(raw, total),
    }


# What each task body spends its samples on, by coarse bucket of the frames below tasks.py.
BUCKETS = (
    ("broker publish", ("apply_async", "send_task", "basic_publish")),
    ("database", ("psycopg", "_cursor_base", "Database.", "queries.py", "ConnectionPool")),
    ("provider HTTP", ("httpx", "httpcore", "create_call", "get_call", "_http.py")),
    ("task events", ("EventDispatcher",)),
)


def _bucket(frames: list[str]) -> str:
    text = ";".join(frames)
    for name, keys in BUCKETS:
        if any(k in text for k in keys):
            return name
    return "other"


def _by_task(raw: Path, total: int) -> dict[str, dict[str, float]]:
    out: dict[str, Counter[str]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        idx = next((i for i, f in enumerate(frames) if "worker/tasks.py" in f), None)
        task = frames[idx].split(" (")[0] if idx is not None else "(outside tasks)"
        below = frames[idx + 1 :] if idx is not None else frames
        out.setdefault(task, Counter())[_bucket(below)] += int(count_s)
    return {
        t: {b: round(100 * n / max(total, 1), 1) for b, n in c.most_common()}
        for t, c in sorted(out.items(), key=lambda kv: -sum(kv[1].values()))
    }


def _steady(stack: Stack, per_second: float, seconds: float) -> None:
    """Schedule one call due now every 1/per_second s for ``seconds`` (own connection)."""
    with stack.connect() as conn:
        t0 = time.monotonic()
        for k in range(int(per_second * seconds)):
            delay = t0 + k / per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stack.schedule_one(conn, 500_000 + k)


def run(
    calls: int = 2000, seconds: float = 10.0, rate: int = 200, steady: float = 0.0
) -> dict[str, Any]:
    spy = _py_spy()
    if spy is None:
        raise SystemExit("py-spy is not installed (.venv/bin/pip install py-spy)")
    out: dict[str, Any] = {}
    with Stack(max_concurrent_calls=2 * calls) as stack:
        stack.fleet.start_worker("worker")
        stack.fleet.start_beat("beat")
        stack.wait_ready()
        pid = stack.fleet.procs["worker"].pid
        raw = Path(tempfile.mkdtemp(prefix="callq-prof-")) / "worker.txt"
        prof = subprocess.Popen(
            [
                spy,
                "record",
                "-p",
                str(pid),
                "-d",
                str(int(seconds)),
                "-r",
                str(rate),
                "--format",
                "raw",
                "-o",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # py-spy attaches
        assert stack.sim is not None
        before = stack.sim.stats()["total_creates"]
        t0 = time.time()
        if steady:
            _steady(stack, steady, seconds)
        else:
            stack.schedule(calls)
        prof.wait(timeout=seconds + 60)
        placed = stack.sim.stats()["total_creates"] - before
        out["placed_during_profile"] = placed
        out["rate_during_profile"] = placed / max(time.time() - t0, 1e-9)
        out["worker"] = summarize(raw) if raw.exists() else {"error": "no py-spy output"}
        with stack.connect() as conn:
            out["assignment_states"] = dict(
                conn.execute("SELECT state, count(*) FROM call_assignments GROUP BY 1").fetchall()
            )
        shutil.rmtree(raw.parent, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--steady",
        type=float,
        default=0.0,
        help="schedule this many calls per second, one at a time, instead of a burst",
    )
    ns = parser.parse_args(argv)
    res = run(ns.calls, ns.seconds, steady=ns.steady)
    log(
        f"profile: {res['placed_during_profile']} calls placed, "
        f"{res['rate_during_profile']:.0f}/s while sampled"
    )
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
