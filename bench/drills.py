"""Fault drills: break the running system on purpose and count what was lost or dialed twice.

    .venv/bin/python -m bench.drills [name ...] [--quick] [--json FILE]

Each drill starts its own stack (scratch database, a Redis of its own, the simulator, real worker
and beat processes), schedules a batch, injects its fault, waits (bounded) for the system to
settle, and prints:

    scheduled   calls scheduled
    terminal    calls in a terminal state (completed, failed, canceled)
    lost        calls neither terminal nor queued at the end
    dialed>1    calls the simulator saw more than one create request for (its own record, by
                queue id; every call is answered, so each must be dialed exactly once)
    slots held  provider slots still taken at the end (sum of provider_load.current_calls)

Every drill must end with 0 lost, 0 dialed more than once, 0 slots held. Servers that are
stopped or restarted are our own (own Redis, own PostgreSQL on its own port).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, log, restart_redis
from bench.stack import Stack
from worker.embedded import wait_until

# Every call answered; short calls so tracking is exercised; small jitter.
SIM_ANSWERED: dict[str, Any] = {
    "seed": 3,
    "outcome_mix": {"completed": 1.0},
    "queue_seconds": 0.05,
    "ring_seconds": 0.1,
    "call_seconds": [0.2, 0.8],
    "record_times": False,
}
# Fast leases and maintenance so recovery is quick; timeouts shorter than the simulator's hold.
DRILL_ENV: dict[str, Any] = {
    "CALLQ_POLL_INTERVAL_SECONDS": "0.5",
    "CALLQ_LEASE_SECONDS": "8",
    "CALLQ_REAPER_INTERVAL_SECONDS": "2",
    "CALLQ_HEALTH_INTERVAL_SECONDS": "2",
    "CALLQ_TRACK_INITIAL_DELAY_SECONDS": "0.3",
    "CALLQ_TRACK_MAX_DELAY_SECONDS": "2",
    "CALLQ_RECONCILE_DELAY_SECONDS": "1",
    "CALLQ_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
    "CALLQ_HTTP_READ_TIMEOUT_SECONDS": "2",
    "CALLQ_LOG_LEVEL": "INFO",
}


@dataclass
class DrillResult:
    name: str
    fault: str
    scheduled: int = 0
    terminal: int = 0
    lost: int = 0
    dialed_more_than_once: int = 0
    slots_held: int = 0
    settled: bool = False
    seconds: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.lost == 0
            and self.dialed_more_than_once == 0
            and self.slots_held == 0
            and self.scheduled > 0
        )

    def take(self, counts: dict[str, Any]) -> None:
        self.scheduled = counts["scheduled"]
        self.terminal = counts["terminal"]
        self.lost = counts["lost"]
        self.dialed_more_than_once = counts["dialed_more_than_once"]
        self.slots_held = counts["slots_held"]
        self.by_status = counts["by_status"]
        if counts["dialed_twice_ids"]:
            self.extra["dialed_twice_ids"] = counts["dialed_twice_ids"]
        if counts["missing_rows"]:
            self.notes.append(f"{counts['missing_rows']} scheduled rows missing from call_queue")
        if counts["live_assignments"]:
            self.extra["live_assignments"] = counts["live_assignments"]


@dataclass
class DrillConfig:
    calls: int
    settle_timeout: float
    admin_url: str | None = None
    keep_logs: bool = False
    # Once every worker is dead (no create can be in progress), move the 120 s dialing leases to
    # now instead of waiting them out: same recovery path, shorter wait (quick and CI runs).
    fast_leases: bool = False


def _run_with_stack(
    name: str,
    fault: str,
    cfg: DrillConfig,
    body: Callable[[Stack, DrillResult], list[Any]],
    *,
    sim_config: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
    own_postgres: bool = False,
    max_concurrent_calls: int = 20,
) -> DrillResult:
    result = DrillResult(name, fault)
    stack = Stack(
        sim_config=dict(sim_config or SIM_ANSWERED),
        env_overrides={**DRILL_ENV, **(env or {})},
        max_concurrent_calls=max_concurrent_calls,
        own_postgres=own_postgres,
        admin_url=cfg.admin_url,
        keep_logs=cfg.keep_logs,
    )
    t0 = time.monotonic()
    try:
        stack.start()
        ids = body(stack, result)
        ok, _ = stack.wait_settled(ids, cfg.settle_timeout)
        result.settled = ok
        result.take(stack.counts(ids))
        if not result.ok:
            result.extra["stuck"] = stack.diagnose(ids)
            result.extra["logs_tail"] = stack.tail_logs(15)
    except Exception as exc:  # a drill reports its error rather than crashing the run
        result.error = f"{type(exc).__name__}: {exc}"
        try:
            result.extra["logs_tail"] = stack.tail_logs(15)
        except Exception as exc2:
            result.notes.append(f"no logs: {exc2}")
    finally:
        result.seconds = time.monotonic() - t0
        stack.stop()
    return result


def _creates(stack: Stack) -> int:
    assert stack.sim is not None
    return int(stack.sim.stats()["total_creates"])


def _wait_creates(stack: Stack, at_least: int, timeout: float) -> int:
    """Wait until the simulator has seen ``at_least`` creates (or the timeout); the count."""
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: _creates(stack) >= at_least, timeout=timeout, interval=0.05)
    return _creates(stack)


# -- the drills -----------------------------------------------------------------------------------


def worker_sigkill(cfg: DrillConfig) -> DrillResult:
    """SIGKILL one of two workers while creates are in flight (slow simulator), then replace it."""

    def body(stack: Stack, result: DrillResult) -> list[Any]:
        stack.fleet.start_worker("w1")
        stack.fleet.start_worker("w2")
        stack.fleet.start_beat("beat")
        stack.wait_ready(workers=2)
        ids = stack.schedule(cfg.calls)
        seen = _wait_creates(stack, max(3, cfg.calls // 4), 60)
        stack.fleet.kill("w1")
        result.notes.append(f"w1 SIGKILLed after {seen} creates")
        seen2 = _wait_creates(stack, cfg.calls // 2, 30)
        stack.fleet.kill("w2")
        result.notes.append(f"w2 SIGKILLed after {seen2} creates")
        if cfg.fast_leases:
            with stack.connect() as conn:
                n = conn.execute(
                    "UPDATE call_queue SET lease_expires_at = now() WHERE status = 'dialing'"
                ).rowcount
            result.notes.append(f"no worker alive: {n} dialing leases moved to now")
        stack.fleet.start_worker("w3")
        return ids

    return _run_with_stack(
        "worker_sigkill",
        "SIGKILL worker mid-placement (x2)",
        cfg,
        body,
        sim_config={**SIM_ANSWERED, "latency_ms": 150},
    )


def redis_restart(cfg: DrillConfig) -> DrillResult:
    """Restart our Redis (no persistence: every queued and unacked message is lost) mid-run."""

    def body(stack: Stack, result: DrillResult) -> list[Any]:
        stack.fleet.start_worker("w1")
        stack.fleet.start_beat("beat")
        stack.wait_ready()
        ids = stack.schedule(cfg.calls)
        seen = _wait_creates(stack, max(3, cfg.calls // 3), 60)
        restart_redis(stack.redis)
        result.notes.append(f"redis restarted (all messages lost) after {seen} creates")
        worker = stack.fleet.procs["w1"]
        with contextlib.suppress(TimeoutError):  # back on the broker, or gone (noted below)
            wait_until(lambda: worker.poll() is not None or stack.consumers() >= 1, timeout=30)
        for name, proc in stack.fleet.procs.items():
            if proc.poll() is not None:
                result.notes.append(f"{name} EXITED (code {proc.returncode}) after the restart")
        return ids

    return _run_with_stack(
        "redis_restart",
        "Redis restarted mid-run (own redis)",
        cfg,
        body,
        sim_config={**SIM_ANSWERED, "latency_ms": 50},
    )


def redis_restart_supervised(cfg: DrillConfig) -> DrillResult:
    """As ``redis_restart``, with a supervisor that starts a worker again when one exits (as a
    Docker restart policy or systemd ``Restart=always`` would)."""

    def body(stack: Stack, result: DrillResult) -> list[Any]:
        stack.fleet.start_worker("w1")
        stack.fleet.start_beat("beat")
        stack.wait_ready()
        ids = stack.schedule(cfg.calls)
        seen = _wait_creates(stack, max(3, cfg.calls // 3), 60)
        restart_redis(stack.redis)
        result.notes.append(f"redis restarted (all messages lost) after {seen} creates")
        restarts = 0
        end = time.monotonic() + min(cfg.settle_timeout, 120)
        while time.monotonic() < end and not stack.settled(ids):
            for name in ("w1", "beat"):
                proc = stack.fleet.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    restarts += 1
                    result.notes.append(f"{name} exited with {proc.returncode}; restarted")
                    stack.fleet.procs.pop(name, None)
                    if name == "beat":
                        stack.fleet.start_beat(name)
                    else:
                        stack.fleet.start_worker(name)
            time.sleep(1)
        result.extra["restarts"] = restarts
        return ids

    return _run_with_stack(
        "redis_restart_supervised",
        "Redis restarted mid-run, processes restarted when they exit",
        cfg,
        body,
        sim_config={**SIM_ANSWERED, "latency_ms": 50},
    )


def postgres_restart(cfg: DrillConfig) -> DrillResult:
    """Restart our own PostgreSQL (immediate stop = crash) mid-run."""

    def body(stack: Stack, result: DrillResult) -> list[Any]:
        assert stack.pg is not None
        stack.fleet.start_worker("w1")
        stack.fleet.start_beat("beat")
        stack.wait_ready()
        ids = stack.schedule(cfg.calls)
        seen = _wait_creates(stack, max(3, cfg.calls // 3), 60)
        t = time.monotonic()
        stack.pg.stop("immediate")
        time.sleep(3)  # the outage itself: three seconds without a database
        stack.pg.start()
        result.notes.append(
            f"postgres crashed (-m immediate), down {time.monotonic() - t:.1f}s, after {seen}"
            " creates"
        )
        if cfg.fast_leases:
            # Creates in flight at the crash ended long ago (HTTP timeout 2 s): move their
            # 120 s dialing leases to now rather than wait them out. The creates' own deadline
            # (a time, not a state to wait for): the read timeout, with margin.
            time.sleep(8)
            with stack.connect() as conn:
                n = conn.execute(
                    "UPDATE call_queue q SET lease_expires_at = now() FROM call_assignments a"
                    " WHERE a.queue_id = q.id AND q.status = 'dialing' AND a.state = 'dialing'"
                    " AND a.dialing_at < now() - interval '8 seconds'"
                ).rowcount
            result.notes.append(f"{n} dialing leases from before the crash moved to now")
        return ids

    return _run_with_stack(
        "postgres_restart",
        "PostgreSQL crash-restarted mid-run (own server)",
        cfg,
        body,
        own_postgres=True,
        sim_config={**SIM_ANSWERED, "latency_ms": 50},
    )


def provider_down(cfg: DrillConfig) -> DrillResult:
    """Vapi refuses connections, then answers 500, then times out (the create still lands), then
    comes back; SynthFlow stays up."""
    phase = 4.0

    def body(stack: Stack, result: DrillResult) -> list[Any]:
        assert stack.sim is not None
        stack.fleet.start_worker("w1")
        stack.fleet.start_beat("beat")
        stack.wait_ready()
        stack.sim.configure(
            {
                "timeout_seconds": 4,  # > the worker's read timeout (2 s): outcome unknown
                "timeout_creates_call": True,
                "outages": [
                    {"provider": "vapi", "start": 0, "end": phase, "mode": "refuse"},
                    {"provider": "vapi", "start": phase, "end": 2 * phase, "mode": "500"},
                    {"provider": "vapi", "start": 2 * phase, "end": 3 * phase, "mode": "timeout"},
                ],
            }
        )
        t0 = time.monotonic()
        ids: list[Any] = []
        # Calls keep arriving through every phase and after it.
        for k in range(4):
            ids += stack.schedule(cfg.calls // 4, start=k * 10_000)
            time.sleep(max(0.0, t0 + (k + 1) * phase - time.monotonic()))
        counters = stack.sim.stats()["counters"]
        result.extra["sim_counters"] = {
            k: v for k, v in counters.items() if k.startswith(("outage", "creates", "rejected"))
        }
        return ids

    return _run_with_stack(
        "provider_down", "Vapi: refused, then 5xx, then timeouts, then back", cfg, body
    )


def provider_429(cfg: DrillConfig) -> DrillResult:
    """Vapi answers 429 beyond 2 concurrent calls (Retry-After 1 s)."""

    def body(stack: Stack, result: DrillResult) -> list[Any]:
        stack.fleet.start_worker("w1")
        stack.fleet.start_beat("beat")
        stack.wait_ready()
        ids = stack.schedule(cfg.calls)
        return ids

    res = _run_with_stack(
        "provider_429",
        "Vapi answers 429 above 2 concurrent calls",
        cfg,
        body,
        sim_config={**SIM_ANSWERED, "max_concurrent": {"vapi": 2}, "retry_after_seconds": 1},
    )
    return res


def two_beats(cfg: DrillConfig) -> DrillResult:
    """Two beat processes (two pollers) and two workers (one listening, one standing by)."""

    def body(stack: Stack, result: DrillResult) -> list[Any]:
        stack.fleet.start_worker("w1")
        stack.fleet.start_worker("w2")
        stack.fleet.start_beat("beat1")
        stack.fleet.start_beat("beat2")
        stack.wait_ready(workers=2)
        ids = []
        for k in range(5):  # several bursts, each a wake-up and a claim
            ids += stack.schedule(cfg.calls // 5, start=k * 10_000)
            time.sleep(0.5)  # pacing: the bursts half a second apart
        return ids

    return _run_with_stack("two_beats", "two beat processes", cfg, body)


def duplicate_task(cfg: DrillConfig) -> DrillResult:
    """Every dispatch task delivered twice at once, and every placed call tracked twice more."""

    def body(stack: Stack, result: DrillResult) -> list[Any]:
        from bench.e2e import _celery_client

        assert stack.sim is not None
        stack.fleet.start_worker("w1", concurrency=16)
        stack.fleet.start_worker("w2", concurrency=16)
        stack.wait_ready(workers=2, listeners=0)
        ids = stack.schedule(cfg.calls)
        # Claim and assign as beat's poll would, then deliver each dispatch twice.
        with stack.connect() as conn:
            rows = conn.execute(
                "SELECT assignment_id::text FROM claim_and_assign_calls(%s, 'drill', 60)",
                (cfg.calls,),
            ).fetchall()
        aids = [r[0] for r in rows]
        app = _celery_client(stack.redis.url)
        try:
            with app.producer_or_acquire() as producer:
                for aid in aids:
                    for _ in range(2):
                        app.send_task(
                            "callq.dispatch",
                            args=(aid,),
                            queue="dispatch",
                            routing_key="dispatch",
                            producer=producer,
                        )
            _wait_creates(stack, len(aids), 60)
            with app.producer_or_acquire() as producer:
                for aid in aids:
                    for _ in range(2):  # the first poll twice more, beside the tick's
                        app.send_task(
                            "callq.track_batch",
                            args=([[aid, 1]],),
                            queue="track",
                            routing_key="track",
                            producer=producer,
                        )
        finally:
            app.close()
        result.notes.append(f"{len(aids)} assignments dispatched twice, tracked twice more")
        stack.fleet.start_beat("beat")  # the reaper and the poller for what is left
        return ids

    return _run_with_stack(
        "duplicate_task",
        "callq.dispatch delivered twice per assignment",
        cfg,
        body,
        # the drill claims the calls itself: no worker may claim them on the NOTIFY first
        env={"CALLQ_LISTEN_ENABLED": "false"},
        max_concurrent_calls=max(20, cfg.calls),
    )


# -- bad input ------------------------------------------------------------------------------------

DRILLS: dict[str, Callable[[DrillConfig], DrillResult]] = {
    "worker_sigkill": worker_sigkill,
    "redis_restart": redis_restart,
    "redis_restart_supervised": redis_restart_supervised,
    "postgres_restart": postgres_restart,
    "provider_down": provider_down,
    "provider_429": provider_429,
    "two_beats": two_beats,
    "duplicate_task": duplicate_task,
}


def passed(r: DrillResult) -> bool:
    return r.ok


def format_table(results: list[DrillResult]) -> str:
    head = (
        "| drill | fault | scheduled | terminal | lost | dialed >1 | slots held | time | result |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(
            f"| {r.name} | {r.fault} | {r.scheduled} | {r.terminal} | {r.lost} | "
            f"{r.dialed_more_than_once} | {r.slots_held} | {r.seconds:.0f}s | "
            f"{'PASS' if passed(r) else 'FAIL' + (' (error)' if r.error else '')} |"
        )
    return "\n".join(lines)


def run(
    names: list[str] | None = None, *, quick: bool = False, admin_url: str | None = None
) -> list[DrillResult]:
    cfg = DrillConfig(
        calls=40 if quick else 200,
        settle_timeout=90 if quick else 240,
        admin_url=admin_url,
        keep_logs=bool(os.environ.get("BENCH_KEEP_LOGS")),
    )
    results = []
    for name in names or list(DRILLS):
        log(f"drill {name}: start")
        r = DRILLS[name](cfg)
        log(
            f"drill {name}: {'PASS' if passed(r) else 'FAIL'} scheduled={r.scheduled} "
            f"terminal={r.terminal} lost={r.lost} dialed>1={r.dialed_more_than_once} "
            f"slots={r.slots_held} ({r.seconds:.0f}s) {r.error or ''} {'; '.join(r.notes)}"
        )
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.drills",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"drills to run (default all): {', '.join(DRILLS)}"
    )
    parser.add_argument("--quick", action="store_true", help="smaller batches, shorter waits")
    parser.add_argument(
        "--append", action="store_true", help="replace only these drills' entries in the JSON file"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / "bench" / "results" / "drills.json",
        help="write the results here (default bench/results/drills.json, which"
        " bench.run puts in RESULTS.md)",
    )
    ns = parser.parse_args(argv)
    bad = [n for n in ns.names if n not in DRILLS]
    if bad:
        parser.error(f"unknown drill(s): {', '.join(bad)}")
    results = run(ns.names or None, quick=ns.quick)
    print(format_table(results))
    for r in results:
        if not passed(r):
            print(
                f"\n{r.name} FAILED: {r.error or ''} by_status={r.by_status} notes={r.notes}"
                f" extra={ {k: v for k, v in r.extra.items() if k != 'logs_tail'} }"
            )
            if r.extra.get("logs_tail"):
                print(r.extra["logs_tail"][-3000:])
    if ns.json:
        command = (
            ".venv/bin/python -m bench.drills"
            + (" " + " ".join(ns.names) if ns.names else "")
            + (" --quick" if ns.quick else "")
        )
        finished = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out = []
        for r in results:
            d = asdict(r) | {"passed": passed(r), "command": command, "finished": finished}
            d["extra"].pop("logs_tail", None)
            out.append(d)
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        if ns.append and ns.json.exists():
            names = {r.name for r in results}
            kept = [d for d in json.loads(ns.json.read_text()) if d["name"] not in names]
            out = kept + out
        ns.json.write_text(json.dumps(out, indent=2, default=str))
    return 0 if all(passed(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
