"""Where the worker's time goes while it places a burst of calls (py-spy, if installed).

    .venv/bin/python -m bench.profile [--calls 2000] [--seconds 10]
    .venv/bin/python -m bench.profile --waits [--calls 2000]

``--waits`` needs no py-spy: it samples pg_stat_activity every 10 ms while a burst goes from
schedule to its last ending, and prints where the backends wait, by statement and by the table
whose row lock a waiting backend holds or wants (a ``Lock:transactionid`` waiter holds the
tuple lock of the row it queues on).

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
    calls: int = 2000,
    seconds: float = 10.0,
    rate: int = 200,
    steady: float = 0.0,
    gil: bool = False,
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
                # the worker command starts Celery as a child process
                "--subprocesses",
                *(["--gil"] if gil else []),
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


WAIT_SAMPLE = """
WITH l AS MATERIALIZED (
  SELECT l.pid, string_agg(DISTINCT c.relname, ',') AS rel FROM pg_locks l
    JOIN pg_class c ON c.oid = l.relation
   WHERE l.locktype = 'tuple' GROUP BY l.pid
), a AS MATERIALIZED (
  SELECT a.pid, a.query, a.wait_event_type, a.wait_event, pg_blocking_pids(a.pid) AS blockers
    FROM pg_stat_activity a
   WHERE a.datname = %s AND a.pid <> pg_backend_pid() AND a.state = 'active'
)
SELECT coalesce(a.wait_event_type || ':' || a.wait_event, 'CPU'),
       coalesce(substring(a.query FROM '(?i)(?:SELECT|FROM)\\s+([a-z_]+)\\('),
                left(regexp_replace(a.query, '\\s+', ' ', 'g'), 30)),
       l.rel,
       (SELECT string_agg(DISTINCT coalesce(substring(b.query FROM
                 '(?i)(?:SELECT|FROM)\\s+([a-z_]+)\\('), left(b.query, 30)), ',')
          FROM a b WHERE b.pid = ANY (a.blockers))
  FROM a LEFT JOIN l ON l.pid = a.pid
"""


def waits(calls: int = 2000) -> dict[str, Any]:
    """Where PostgreSQL backends wait while a burst of ``calls`` is placed (until the
    simulator saw every create: what bench.e2e times), then ended (until every call settled)."""
    import threading

    import psycopg

    from worker.embedded import wait_until

    out: dict[str, Any] = {"calls": calls}
    with Stack(max_concurrent_calls=2 * calls) as stack:
        stack.fleet.start_worker("worker")
        stack.fleet.start_beat("beat")
        stack.warm_up()
        assert stack.db is not None and stack.sim is not None
        sim, dbname = stack.sim, stack.db.name
        phases: dict[str, Counter[tuple[str, str, str, str]]] = {
            "placing": Counter(),
            "ending": Counter(),
        }
        samples = Counter[str]()
        phase = ["placing"]
        stop = threading.Event()

        def sample() -> None:
            with psycopg.connect(stack.url, autocommit=True) as conn:
                while not stop.is_set():
                    now = phase[0]
                    for ev, stmt, rel, by in conn.execute(WAIT_SAMPLE, (dbname,)):
                        phases[now][(ev, stmt, rel or "", by or "")] += 1
                    samples[now] += 1
                    time.sleep(0.01)

        th = threading.Thread(target=sample, daemon=True)
        before = sim.stats()["total_creates"]
        th.start()
        t0 = time.time()
        ids = stack.schedule(calls)
        wait_until(lambda: sim.stats()["total_creates"] - before >= calls, timeout=300)
        out["seconds_to_placed"] = round(time.time() - t0, 2)
        phase[0] = "ending"
        ok, _ = stack.wait_settled(ids, 300)
        out["seconds_to_settled"] = round(time.time() - t0, 2)
        out["settled"] = ok
        stop.set()
        th.join(5)
        for name, counts in phases.items():
            total = sum(counts.values()) or 1
            out[name] = {
                "samples": samples[name],
                "active_backends_avg": round(total / max(samples[name], 1), 2),
                "by_wait": _share(counts, lambda k: k[0], total),
                "by_statement": _share(counts, lambda k: k[1], total),
                "lock_waits_by_statement_and_table": _share(
                    Counter({k: v for k, v in counts.items() if k[0].startswith("Lock")}),
                    lambda k: f"{k[1]} on {k[2] or '?'} ({k[0]}), behind {k[3] or '?'}",
                    total,
                ),
            }
    return out


def _share(counts: Counter[Any], key: Any, total: int, top: int = 12) -> dict[str, float]:
    agg: Counter[str] = Counter()
    for k, v in counts.items():
        agg[key(k)] += v
    return {k: round(v / total, 3) for k, v in agg.most_common(top)}


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
    parser.add_argument(
        "--gil",
        action="store_true",
        help="sample only the thread holding the GIL: Python's own CPU, not threads waiting",
    )
    parser.add_argument(
        "--waits",
        action="store_true",
        help="sample PostgreSQL's wait events (no py-spy) while a burst is placed and ended",
    )
    ns = parser.parse_args(argv)
    if ns.waits:
        print(json.dumps(waits(ns.calls), indent=2))
        return 0
    res = run(ns.calls, ns.seconds, steady=ns.steady, gil=ns.gil)
    log(
        f"profile: {res['placed_during_profile']} calls placed, "
        f"{res['rate_during_profile']:.0f}/s while sampled"
    )
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
