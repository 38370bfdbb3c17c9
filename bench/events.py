"""What the call-event log costs: PostgreSQL CPU per claimed row and per call, with the event
triggers on and off.

    .venv/bin/python -m bench.events [--quick]

The figure is the CPU time of the one server backend that runs the work (read from
``/proc/<pid>/stat``), not a rate: on a shared machine a rate mostly measures the neighbours,
while the CPU a backend spends on a fixed amount of work barely moves. Each workload runs
alternately with the event triggers enabled and disabled (``ALTER TABLE ... DISABLE TRIGGER``)
on one scratch database, ``rounds`` times; the figure is the median of each side.

    batch claim   claim_and_assign_calls(50) until ``rows`` calls are claimed     µs per row
                  (writes 50 'assigned' events per statement)
    call path     schedule_call, claim_and_assign_calls(1), mark_call_dialing,      µs per call
                  mark_call_placed, complete_call, one call at a time
                  (writes the six events of a completed call)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import psycopg

from bench.claim import FILL
from bench.common import ScratchDB, log
from worker.seed import daytime_zone

# The triggers that write call_events (the users trigger only fires on a user's deletion).
TRIGGERS = (
    ("call_queue", "call_queue_log_insert"),
    ("call_queue", "call_queue_log_status"),
    ("call_assignments", "call_assignments_log_insert"),
    ("call_assignments", "call_assignments_log_state"),
)

Conn = psycopg.Connection[tuple[Any, ...]]


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _set_triggers(conn: Conn, on: bool) -> None:
    verb = "ENABLE" if on else "DISABLE"
    for table, trigger in TRIGGERS:
        conn.execute(f"ALTER TABLE {table} {verb} TRIGGER {trigger}")  # type: ignore[arg-type]


def _reset(conn: Conn, fill: int, seeded: Any) -> None:
    conn.execute("TRUNCATE call_queue, call_events, call_history CASCADE")  # frees the slots
    conn.execute(
        "UPDATE provider_availability SET status = 'online', consecutive_failures = 0,"
        " circuit_open_until = NULL"
    )
    if fill:
        params = {"user_id": seeded.user_id, "template_id": seeded.template_id, "n": fill,
                  "zone": daytime_zone()}  # fmt: skip
        conn.execute(FILL.format(table="call_queue"), params)  # type: ignore[arg-type]
    conn.execute("VACUUM ANALYZE call_queue")
    conn.execute("VACUUM ANALYZE call_events")


def _batch(conn: Conn, pid: int, rows: int) -> float:
    """Backend CPU µs per claimed row."""
    t0 = _cpu_seconds(pid)
    done = 0
    while done < rows:
        row = conn.execute(
            "SELECT count(*) FROM claim_and_assign_calls(50, 'bench', 60)"
        ).fetchone()
        done += int(row[0]) if row else 0
        if not row or not row[0]:
            raise RuntimeError("batch claim found nothing to claim")
    return (_cpu_seconds(pid) - t0) / done * 1e6


def _call_path(conn: Conn, pid: int, calls: int, seeded: Any) -> float:
    """Backend CPU µs per call, scheduled to completed."""
    zone = daytime_zone()  # the recipient's zone, where it is daytime: inside its window
    t0 = _cpu_seconds(pid)
    for _ in range(calls):
        conn.execute(
            "SELECT schedule_call(%s, %s, 'Bench', '+15550100123', NULL, NULL, 5, '{}', '{}',"
            " NULL, %s)",
            (seeded.user_id, seeded.template_id, zone),
        )
        row = conn.execute(
            "SELECT assignment_id FROM claim_and_assign_calls(1, 'bench', 60)"
        ).fetchone()
        if row is None:
            raise RuntimeError("call path: nothing claimed")
        aid = row[0]
        conn.execute("SELECT mark_call_dialing(%s)", (aid,))
        conn.execute("SELECT mark_call_placed(%s, 'pc')", (aid,))
        conn.execute("SELECT complete_call(%s, 30)", (aid,))
    return (_cpu_seconds(pid) - t0) / calls * 1e6


def run(*, quick: bool = False) -> dict[str, Any]:
    """Medians per workload and side, and the relative cost (on / off - 1)."""
    from worker.seed import seed_demo

    rows, calls, rounds = (5_000, 300, 3) if quick else (20_000, 1_500, 5)
    slots = rows
    db = ScratchDB()
    db.create()
    log(f"events: scratch database {db.name}")
    cost: dict[str, dict[str, list[float]]] = {
        "batch": {"on": [], "off": []},
        "call": {"on": [], "off": []},
    }
    try:
        with psycopg.connect(db.url, autocommit=True, prepare_threshold=0) as conn:
            seeded = seed_demo(conn, sim_base_url="http://127.0.0.1:9", max_concurrent_calls=slots)
            pid = conn.info.backend_pid
            for _ in range(rounds):
                for side in ("on", "off"):
                    _set_triggers(conn, side == "on")
                    _reset(conn, rows, seeded)
                    cost["batch"][side].append(_batch(conn, pid, rows))
                    _reset(conn, 0, seeded)
                    cost["call"][side].append(_call_path(conn, pid, calls, seeded))
                    log(
                        f"events: triggers {side:3s}: batch claim"
                        f" {cost['batch'][side][-1]:6.1f} µs/row,"
                        f" call path {cost['call'][side][-1]:7.1f} µs/call"
                    )
            _set_triggers(conn, True)
            _reset(conn, 0, seeded)
            _call_path(conn, pid, calls, seeded)
            size = conn.execute(
                "SELECT pg_total_relation_size('call_events')::float / count(*) FROM call_events"
            ).fetchone()
    finally:
        db.drop()
    out: dict[str, Any] = {"rows": rows, "calls": calls, "rounds": rounds}
    for name, sides in cost.items():
        on, off = statistics.median(sides["on"]), statistics.median(sides["off"])
        out[name] = {"on_us": on, "off_us": off, "cost": on / off - 1 if off else float("nan")}
    out["bytes_per_event"] = round(size[0]) if size else None
    out["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return out


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
