"""End to end against the engine's limit; latency of a call scheduled for now; worker memory.

All on one :class:`bench.stack.Stack` (scratch database, own Redis, simulator answering at once
with zero call duration, one worker process with the project's default pool and concurrency and
one beat process):

* **engine baseline**: ``callq.noop`` tasks published to the ``dispatch`` queue of the same broker
  and consumed by the same worker; rate = tasks / (time from first publish to queue drained,
  unacknowledged included).
* **ours**: ``count`` calls scheduled through ``schedule_call`` in one transaction (one NOTIFY at
  commit); rate = calls / (time from the commit to the last create request at the simulator).
  A first burst of as many calls goes before it (a fresh worker's pool grows and its sessions
  plan their statements), reported as ``first_burst``.
* **latency**: commit of ``schedule_call`` -> create request arrival at the simulator (its own
  wall-clock record, matched to the queue id through the assignment id), one call at a time
  (idle), then at a steady rate of half the measured throughput.
* **memory**: RSS of a fresh worker (process tree) after 1,000 and after 50,000 calls.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import psutil
import redis

from bench.common import log, median, percentile
from bench.stack import Stack
from worker.embedded import wait_until

IDLE_GAP_SECONDS = 0.3  # between the idle latency calls: each finds the fleet idle


def _celery_client(broker_url: str) -> Any:
    from celery import Celery

    app = Celery("callq-bench", broker=broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
    )
    return app


def _queue_depth(r: redis.Redis, queue: str = "dispatch") -> int:
    return int(r.llen(queue)) + int(r.hlen("unacked"))


def _wait_drained(r: redis.Redis, timeout: float) -> float | None:
    """The wall time at which the dispatch queue was empty (acknowledged), or None."""
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: _queue_depth(r) == 0, timeout=timeout, interval=0.01)
        return time.time()
    return None


def noop_rate(stack: Stack, count: int) -> dict[str, Any]:
    """Publish ``count`` no-op tasks and time the drain through the running worker."""
    app = _celery_client(stack.redis.url)
    r = redis.Redis.from_url(stack.redis.url)
    try:
        # Warm-up: the worker is connected and consuming.
        with app.producer_or_acquire() as producer:
            for _ in range(50):
                app.send_task(
                    "callq.noop", queue="dispatch", routing_key="dispatch", producer=producer
                )
        if _wait_drained(r, 60) is None:
            raise RuntimeError("noop warm-up did not drain")
        t0 = time.time()
        with app.producer_or_acquire() as producer:
            for _ in range(count):
                app.send_task(
                    "callq.noop", queue="dispatch", routing_key="dispatch", producer=producer
                )
        published = time.time()
        done = _wait_drained(r, 600)
        if done is None:
            raise RuntimeError("noop tasks did not drain in 600 s")
    finally:
        app.close()
        r.close()
    return {
        "count": count,
        "seconds": done - t0,
        "rate": count / (done - t0),
        "publish_rate": count / max(published - t0, 1e-9),
    }


def _arrivals(stack: Stack) -> dict[str, float]:
    """queue id -> wall time of its first create request at the simulator."""
    assert stack.sim is not None
    times = stack.sim.stats(times=True).get("create_times", {})
    if not times:
        return {}
    with stack.connect() as conn:
        rows = conn.execute(
            "SELECT id::text, queue_id::text FROM call_assignments WHERE id = ANY(%s::uuid[])",
            (list(times),),
        ).fetchall()
    out: dict[str, float] = {}
    for aid, qid in rows:
        first = min(t["wall"] for t in times[aid])
        out[qid] = min(first, out.get(qid, first))
    return out


def ours_rate(stack: Stack, count: int, start: int) -> dict[str, Any]:
    """Schedule ``count`` calls due now in one transaction; time to the last create request."""
    assert stack.sim is not None
    before = stack.sim.stats()["total_creates"]
    ids = stack.schedule(count, start=start)
    t_commit = time.time()
    ids_s = {str(i) for i in ids}
    sim = stack.sim
    with contextlib.suppress(TimeoutError):  # fewer arrivals are reported below
        wait_until(lambda: sim.stats()["total_creates"] - before >= count, timeout=600)
    arrivals = _arrivals(stack)
    got = [arrivals[q] for q in ids_s if q in arrivals]
    if len(got) < count:
        log(f"e2e: only {len(got)} of {count} calls reached the simulator")
    last = max(got) if got else time.time()
    return {
        "count": count,
        "arrived": len(got),
        "seconds": last - t_commit,
        "rate": len(got) / (last - t_commit),
        "ids": ids,
    }


def latency(
    stack: Stack, *, idle_calls: int, load_rate: float, load_seconds: float, start: int
) -> dict[str, Any]:
    """Commit -> create latency, idle (one at a time) and under a steady schedule rate."""
    # one at a time: the create arrives (bounded wait), then an idle gap
    commits = stack.one_at_a_time(
        lambda conn, i: stack.schedule_one(conn, start + i),
        idle_calls,
        IDLE_GAP_SECONDS,
        strict=False,
    )
    idle_ids = set(commits)
    # Steady load: a pacing thread schedules at load_rate for load_seconds.
    load_commits: dict[str, float] = {}
    n_load = int(load_rate * load_seconds)

    def pace() -> None:
        with stack.connect() as conn:
            t0 = time.monotonic()
            for k in range(n_load):
                due = t0 + k / load_rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                qid, t = stack.schedule_one(conn, start + idle_calls + k)
                load_commits[qid] = t

    th = threading.Thread(target=pace, daemon=True)
    th.start()
    th.join(load_seconds + 120)
    with contextlib.suppress(TimeoutError):  # what did not arrive is left out of the figures
        wait_until(lambda: set(load_commits) <= set(_arrivals(stack)), timeout=120, interval=0.5)
    arrivals = _arrivals(stack)

    def summary(ids: set[str], commits_: dict[str, float]) -> dict[str, Any]:
        lat = [(arrivals[q] - commits_[q]) * 1000 for q in ids if q in arrivals]
        return {
            "calls": len(ids),
            "arrived": len(lat),
            "p50_ms": median(lat),
            "p99_ms": percentile(lat, 99),
            "max_ms": max(lat) if lat else float("nan"),
        }

    return {
        "idle": summary(idle_ids, commits),
        "load": summary(set(load_commits), load_commits) | {"rate": load_rate},
    }


def rss_of(pid: int) -> int:
    """Resident bytes of a process and its children."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total


def memory(
    stack: Stack, *, first: int, total: int, start: int, chunk: int = 2000
) -> dict[str, Any]:
    """RSS of a fresh worker after ``first`` and after ``total`` calls placed and completed."""
    assert stack.sim is not None
    stack.fleet.stop("worker")
    proc = stack.fleet.start_worker("worker")
    stack.wait_ready()
    done = 0
    samples: dict[str, Any] = {}
    t0 = time.monotonic()
    while done < total:
        n = min(chunk, first - done if done < first else total - done)
        ids = stack.schedule(n, start=start + done)
        ok, _ = stack.wait_settled(ids, timeout=300)
        if not ok:
            log(f"memory: chunk at {done} did not settle: {stack.counts(ids)['by_status']}")
            samples["error"] = f"chunk at {done} calls did not settle"
            break
        stack.sim.reset()  # all ended: keep the simulator small
        done += n
        if done == first:
            samples["first"] = {"calls": done, "rss": rss_of(proc.pid)}
            log(f"memory: {done} calls, worker RSS {samples['first']['rss'] / 2**20:.1f} MiB")
        if done % 10_000 == 0:
            log(
                f"memory: {done} calls, worker RSS {rss_of(proc.pid) / 2**20:.1f} MiB "
                f"({time.monotonic() - t0:.0f}s)"
            )
    samples["last"] = {"calls": done, "rss": rss_of(proc.pid)}
    first_rss = samples.get("first", {}).get("rss") or samples["last"]["rss"]
    samples["growth"] = samples["last"]["rss"] / first_rss - 1
    samples["seconds"] = time.monotonic() - t0
    log(
        f"memory: {done} calls, worker RSS {samples['last']['rss'] / 2**20:.1f} MiB, "
        f"growth {samples['growth'] * 100:.1f}%"
    )
    return samples


def run(*, quick: bool = False) -> dict[str, Any]:
    """Throughput against no-op tasks, latency, memory: the module docstring's figures."""
    n_calls = 1000 if quick else 3000
    out: dict[str, Any] = {}
    stack = Stack(
        max_concurrent_calls=2 * n_calls, env_overrides={"CALLQ_POLL_INTERVAL_SECONDS": "1.0"}
    )
    stack.start()
    log(
        f"e2e: stack up (db {stack.db.name if stack.db else '?'}, redis {stack.redis.url}, "
        f"sim {stack.sim.base_url if stack.sim else '?'}, logs {stack.log_dir})"
    )
    try:
        stack.fleet.start_worker("worker")
        stack.fleet.start_beat("beat")
        _warm_up(stack)
        out["throughput"] = throughput(stack, n_noop=2000 if quick else 6000, n_calls=n_calls)
        load_rate = max(5.0, min(100.0, 0.5 * out["throughput"]["ours"]["rate"]))
        out["latency"] = _latency(stack, quick=quick, load_rate=load_rate)
        out["memory"] = memory(
            stack, first=500 if quick else 1000, total=5000 if quick else 50_000, start=200_000
        )
        out["final_counts"] = {k: v for k, v in stack.counts().items() if k != "dialed_twice_ids"}
    finally:
        stack.stop()
    return out


def throughput_only(*, n_calls: int = 1000, n_noop: int = 2000) -> dict[str, Any]:
    """The quick run's throughput figure alone, on a stack of its own (about 40 s): for
    alternating before/after runs."""
    stack = Stack(
        max_concurrent_calls=2 * n_calls, env_overrides={"CALLQ_POLL_INTERVAL_SECONDS": "1.0"}
    )
    stack.start()
    try:
        stack.fleet.start_worker("worker")
        stack.fleet.start_beat("beat")
        _warm_up(stack)
        out = throughput(stack, n_noop=n_noop, n_calls=n_calls)
        log(f"e2e: ratio {out['ratio']:.2f}")
        return out
    finally:
        stack.stop()


def _warm_up(stack: Stack, calls: int = 20) -> None:
    """Calls through the whole path until the simulator saw their creates (settling is
    checked after the measured batch)."""
    assert stack.sim is not None
    sim = stack.sim
    warm = stack.schedule(calls, start=900_000)
    try:
        wait_until(lambda: sim.stats()["total_creates"] >= len(warm), timeout=60)
    except TimeoutError:
        raise RuntimeError(
            f"warm-up calls were not placed: {stack.counts(warm)}\n" + stack.tail_logs()
        ) from None


def throughput(stack: Stack, *, n_noop: int, n_calls: int) -> dict[str, Any]:
    """No-op tasks, then calls, then no-op tasks again; the ratio to the faster no-op rate.

    A first burst of as many calls goes before: the worker's pool of database connections grows
    to its size in it, and each new server session plans every statement on first use (about
    40 ms of server CPU per connection), as a running fleet's sessions already have. Its rate is
    reported beside (``first_burst``): a fresh worker's first seconds."""
    assert stack.sim is not None
    first = ours_rate(stack, n_calls, start=600_000)
    first_ids = first.pop("ids")
    ok, _ = stack.wait_settled(first_ids, 120)
    if ok:
        stack.sim.reset()
    log(f"e2e: first burst {first['rate']:.0f} calls/s (a fresh worker; settled={ok})")
    noop = noop_rate(stack, n_noop)
    log(f"e2e: noop tasks {noop['rate']:.0f}/s ({noop['count']} in {noop['seconds']:.1f}s)")
    ours = ours_rate(stack, n_calls, start=0)
    log(f"e2e: calls {ours['rate']:.0f}/s ({ours['arrived']} in {ours['seconds']:.1f}s)")
    ids = ours.pop("ids")
    ok, secs = stack.wait_settled(ids, 120)
    ours["settled"] = ok
    if ok:
        stack.sim.reset()  # every call ended: forget them (smaller stats from here on)
    log(
        f"e2e: batch settled={ok} after {secs:.1f}s more"
        + ("" if ok else f" (NOT settled: {stack.counts(ids)['by_status']})")
    )
    noop2 = noop_rate(stack, n_noop)
    log(f"e2e: noop tasks again {noop2['rate']:.0f}/s")
    ratio = ours["rate"] / max(noop["rate"], noop2["rate"])
    return {"noop": noop, "noop_after": noop2, "ours": ours, "ratio": ratio, "first_burst": first}


def _latency(stack: Stack, *, quick: bool, load_rate: float) -> dict[str, Any]:
    lat = latency(
        stack,
        idle_calls=20 if quick else 60,
        load_rate=load_rate,
        load_seconds=10 if quick else 30,
        start=100_000,
    )
    log(
        f"e2e: latency idle p50 {lat['idle']['p50_ms']:.1f} ms p99 "
        f"{lat['idle']['p99_ms']:.1f} ms; at {load_rate:.0f}/s p50 "
        f"{lat['load']['p50_ms']:.1f} ms p99 {lat['load']['p99_ms']:.1f} ms"
    )
    return lat


def latency_sweep(
    rates: tuple[float, ...] = (10, 25, 50, 100), seconds: float = 15
) -> dict[str, Any]:
    """Commit -> create latency at several steady schedule rates (fresh stack, one worker)."""
    out: dict[str, Any] = {}
    stack = Stack(max_concurrent_calls=2000)
    stack.start()
    try:
        stack.fleet.start_worker("worker")
        stack.fleet.start_beat("beat")
        stack.wait_ready()
        start = 300_000
        for rate in rates:
            lat = latency(stack, idle_calls=0, load_rate=rate, load_seconds=seconds, start=start)
            start += int(rate * seconds) + 10
            out[str(rate)] = lat["load"]
            log(
                f"e2e: latency at {rate:.0f}/s: p50 {lat['load']['p50_ms']:.1f} ms, p99 "
                f"{lat['load']['p99_ms']:.1f} ms ({lat['load']['arrived']} calls)"
            )
            wait_until(lambda: _quiet(stack), timeout=120, interval=0.5, what="the calls' end")
    finally:
        stack.stop()
    return out


def _quiet(stack: Stack) -> bool:
    """No call queued or in flight: the next rate starts on an idle fleet."""
    counts = stack.counts()
    return counts["in_flight"] == 0 and counts["queued"] == 0


def merge_sweep(sweep: dict[str, Any]) -> None:
    """Put a sweep into bench/results/latest.json and re-render RESULTS.md."""
    import json

    from bench import run as run_mod

    latest = run_mod.RESULTS_DIR / "latest.json"
    results = json.loads(latest.read_text())
    results.setdefault("e2e", {})["latency_sweep"] = sweep
    latest.write_text(json.dumps(results, indent=2, default=str))
    drills_path = run_mod.RESULTS_DIR / "drills.json"
    drills = json.loads(drills_path.read_text()) if drills_path.exists() else None
    command = results.get("e2e", {}).get("measured", "").split("(", 1)[-1].rstrip(")")
    run_mod.write_markdown(
        results, run_mod.rows_from(results), drills, command or ".venv/bin/python -m bench.run"
    )


if __name__ == "__main__":
    import json
    import sys

    if "--throughput" in sys.argv:
        print(json.dumps(throughput_only(), indent=2, default=str))
    elif "--latency-sweep" in sys.argv:
        sweep = latency_sweep()
        if "--merge" in sys.argv:
            merge_sweep(sweep)
        print(json.dumps(sweep, indent=2, default=str))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
