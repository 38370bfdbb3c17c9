"""Claim path vs the database's limit, measured with pgbench on one server in one run.

Four workloads, each at 2 and 8 concurrent clients, each on a freshly filled queue:

    ours single   SELECT assign_call_to_provider(q.queue_id, get_best_available_provider())
                  FROM get_next_call_in_queue() q           (claim one + choose + assign)
    bare single   UPDATE bare_queue SET status='claimed' ... WHERE id = (SELECT id ... ORDER BY
                  priority, scheduled_time, created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
    ours batch    SELECT count(*) FROM claim_and_assign_calls(50, 'bench', 60)
    bare batch    the same UPDATE with LIMIT 50

and, informative, ``floor single``: the writes the description's path makes, with none of its
rules (fair order, plans, calling windows, provider checks) and no triggers or foreign-key checks
(``session_replication_role = replica``; the tables' CHECKs hold): the call claimed, its tenant's
counter, a 'claimed' event; a slot, the assignment, the call assigned, an 'assigned' event. Two
statements in one function (``bench_floor_single``), one call per transaction like ours. What
any implementation of the path with these tables pays; bench/FINDINGS.md 24.

``bare_queue`` is ``call_queue``'s twin: same columns, defaults, CHECKs, indexes (so the same index
churn) and storage/autovacuum options, but no triggers, foreign keys, providers or assignments.
The rate is rows moved out of ``queued`` (counted in the table afterwards) per second of pgbench
run time; pgbench (C) keeps the client out of the measurement.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.common import PG_BIN, ScratchDB, log, url_parts
from worker.seed import daytime_zone

SCRIPTS = {
    "ours_single": (
        "SELECT assign_call_to_provider(q.queue_id, get_best_available_provider())"
        " FROM get_next_call_in_queue() q;\n"
    ),
    "bare_single": (
        "UPDATE bare_queue SET status = 'claimed', claimed_by = 'bench', claimed_at = now(),"
        " lease_expires_at = now() + interval '60 seconds' WHERE id = (SELECT id FROM bare_queue"
        " WHERE status = 'queued' AND NOT via_campaign AND scheduled_time <= now()"
        " ORDER BY priority, scheduled_time, created_at LIMIT 1 FOR UPDATE SKIP LOCKED);\n"
    ),
    "ours_batch": "SELECT count(*) FROM claim_and_assign_calls(50, 'bench', 60);\n",
    # informative: the worker's hot path with a batch of one (claims straight to 'assigned')
    "ourscaa_single": "SELECT count(*) FROM claim_and_assign_calls(1, 'bench', 60);\n",
    "floor_single": "SELECT bench_floor_single();\n",
    "bare_batch": (
        "WITH c AS (SELECT id FROM bare_queue WHERE status = 'queued' AND NOT via_campaign"
        " AND scheduled_time <= now()"
        " ORDER BY priority, scheduled_time, created_at LIMIT 50 FOR UPDATE SKIP LOCKED)"
        " UPDATE bare_queue b SET status = 'claimed', claimed_by = 'bench', claimed_at = now(),"
        " lease_expires_at = now() + interval '60 seconds' FROM c WHERE b.id = c.id;\n"
    ),
}

# Queued rows per second of a run, by side and kind: above the fastest rate seen on 2 cores.
FILL_PER_SECOND = {
    ("bare", "single"): 25_000,
    ("ours", "single"): 8_000,
    ("ourscaa", "single"): 8_000,
    ("floor", "single"): 12_000,
    ("bare", "batch"): 100_000,
    ("ours", "batch"): 40_000,
}

FILL = """
INSERT INTO {table} (user_id, template_id, recipient_name, recipient_phone, priority,
                     scheduled_time, custom_variables, created_at, recipient_timezones)
SELECT %(user_id)s, %(template_id)s, 'Bench ' || g, '+1555' || lpad((g %% 10000000)::text, 7, '0'),
       1 + (g %% 10), now() - interval '10 minutes' + g * interval '1 microsecond',
       '{{"company_name": "Acme"}}'::jsonb, now() - interval '10 minutes', ARRAY[%(zone)s]
FROM generate_series(1, %(n)s) g
"""


@dataclass
class ClaimResult:
    workload: str
    clients: int
    seconds: float
    rows: int
    transactions: int
    failed: int
    filled: int
    waits: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def exhausted(self) -> bool:
        return self.rows >= self.filled


def _setup(conn: psycopg.Connection[Any], max_slots: int) -> tuple[Any, Any]:
    from worker.seed import seed_demo

    seeded = seed_demo(
        conn, sim_base_url="http://127.0.0.1:9", max_concurrent_calls=max_slots, call_limit=None
    )
    # The twin table: same shape and indexes, same storage options, nothing else.
    conn.execute(
        "CREATE TABLE bare_queue (LIKE call_queue INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
        " INCLUDING INDEXES INCLUDING STORAGE)"
    )
    opts = conn.execute(
        "SELECT reloptions FROM pg_class WHERE oid = 'public.call_queue'::regclass"
    ).fetchone()
    if opts and opts[0]:
        conn.execute(f"ALTER TABLE bare_queue SET ({', '.join(opts[0])})")
    row = conn.execute(
        "SELECT id FROM call_service_providers ORDER BY priority, id LIMIT 1"
    ).fetchone()
    assert row is not None
    conn.execute(FLOOR_FUNCTION.replace("{provider}", str(row[0])))  # type: ignore[call-overload]
    return seeded.user_id, seeded.template_id


# The floor: the path's writes as two statements (see the module's docstring). The provider is
# the seeded first one, written in (a constant, like the bare claim's literals).
FLOOR_FUNCTION = """
CREATE OR REPLACE FUNCTION bench_floor_single() RETURNS uuid
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
  v_q record;
  v_a uuid := gen_random_uuid();
  v_p uuid := '{provider}';
BEGIN
  PERFORM set_config('synchronous_commit', 'off', true);  -- as ours
  WITH c AS (
    UPDATE public.call_queue q
       SET status = 'claimed', claimed_at = now(),
           lease_expires_at = now() + interval '60 seconds', counter_stripe = 0
     WHERE q.id = (SELECT f.id FROM public.call_queue f
                    WHERE f.status = 'queued' AND NOT f.via_campaign AND f.scheduled_time <= now()
                    ORDER BY f.priority, f.scheduled_time, f.created_at
                    LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING q.id, q.user_id, q.attempts),
  k AS (  -- one of the tenant's counter stripes (a single counter row would serialize claims)
    UPDATE public.tenant_call_counters t
       SET queued = t.queued - 1, claimed = t.claimed + 1, updated_at = now()
     WHERE (t.user_id, t.stripe) = (
             SELECT x.user_id, x.stripe
               FROM public.tenant_call_counters x JOIN c ON x.user_id = c.user_id
              ORDER BY x.stripe LIMIT 1 FOR UPDATE OF x SKIP LOCKED)),
  e AS (
    INSERT INTO public.call_events (queue_id, user_id, kind, attempt)
    SELECT c.id, c.user_id, 'claimed', c.attempts FROM c)
  SELECT c.id, c.user_id, c.attempts INTO v_q FROM c;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  WITH s AS (
    UPDATE public.provider_slots s SET assignment_id = v_a
     WHERE s.provider_id = v_p
       AND s.slot_no = (SELECT f.slot_no FROM public.provider_slots f
                         WHERE f.provider_id = v_p AND f.assignment_id IS NULL
                         ORDER BY f.freed_at, f.slot_no LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING s.caller_id),
  a AS (
    INSERT INTO public.call_assignments (id, queue_id, provider_id, state, attempt, caller_id)
    SELECT v_a, v_q.id, v_p, 'assigned', v_q.attempts + 1, s.caller_id FROM s),
  u AS (
    UPDATE public.call_queue q SET status = 'assigned'
     WHERE q.id = v_q.id AND EXISTS (SELECT 1 FROM s)),
  e AS (
    INSERT INTO public.call_events (queue_id, user_id, kind, attempt, provider_id, assignment_id)
    SELECT v_q.id, v_q.user_id, 'assigned', v_q.attempts + 1, v_p, v_a FROM s)
  SELECT v_a INTO v_a FROM s;
  RETURN v_a;
END
$$;
"""

# The floor runs without triggers or foreign-key checks (a superuser's setting: the benchmark's
# own scratch database on a server it administers).
FLOOR_OPTIONS = "-c session_replication_role=replica"


def _refill(url: str, table: str, n: int, user_id: Any, template_id: Any, max_slots: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        if table == "call_queue":
            conn.execute("TRUNCATE call_queue CASCADE")  # frees every provider slot
            conn.execute(
                "UPDATE provider_availability pa SET status = 'online', consecutive_failures = 0,"
                " circuit_open_until = NULL"
            )
        else:
            conn.execute("TRUNCATE bare_queue")
        conn.execute(
            FILL.format(table=table),
            # one recipient zone per call, where it is daytime: every call passes the window
            {"user_id": user_id, "template_id": template_id, "n": n, "zone": daytime_zone()},
        )
        conn.execute(f"VACUUM ANALYZE {table}")
        conn.execute("VACUUM ANALYZE provider_availability")
        conn.execute("VACUUM ANALYZE provider_slots")
        conn.execute("CHECKPOINT")


def _count(url: str, table: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE status <> 'queued'").fetchone()
        return int(row[0]) if row else 0


class WaitSampler:
    """Samples pg_stat_activity of the benchmark database every 10 ms: where backends wait."""

    def __init__(self, url: str, dbname: str) -> None:
        self.url, self.dbname = url, dbname
        self.counts: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), count(*)"
                    " FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
                    " AND state = 'active' GROUP BY 1",
                    (self.dbname,),
                ).fetchall()
                self.samples += 1
                for key, n in rows:
                    self.counts[key] = self.counts.get(key, 0) + int(n)
                time.sleep(0.01)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def top(self, n: int = 4) -> dict[str, float]:
        """Share of sampled active backends per wait event (CPU = not waiting)."""
        total = sum(self.counts.values()) or 1
        best = sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]
        return {k: round(v / total, 3) for k, v in best}


def _pgbench(
    url: str, script: str, clients: int, seconds: int, options: str = ""
) -> tuple[int, int, str]:
    parts = url_parts(url)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
        path = f.name
    os.chmod(path, 0o644)
    args = [
        str(PG_BIN / "pgbench"),
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-T",
        str(seconds),
        "-f",
        path,
        "-h",
        parts.get("host", "127.0.0.1"),
        "-p",
        parts.get("port", "5432"),
        "-U",
        parts.get("user", "postgres"),
        parts["dbname"],
    ]
    env = {**os.environ}
    if options:
        env["PGOPTIONS"] = options
    if parts.get("password"):
        env["PGPASSWORD"] = parts["password"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, env=env)
    finally:
        Path(path).unlink(missing_ok=True)
    text = out.stdout + out.stderr
    tx = re.search(r"number of transactions actually processed: (\d+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    if out.returncode not in (0, 2) or tx is None:
        raise RuntimeError(f"pgbench failed ({out.returncode}): {text[-2000:]}")
    return int(tx.group(1)), int(failed.group(1)) if failed else 0, text


def _measure(
    db: ScratchDB, workload: str, clients: int, seconds: int, n: int, setup: tuple[Any, ...]
) -> ClaimResult:
    """One pgbench run of ``workload`` on a freshly filled queue."""
    user_id, template_id, max_slots, async_commit = setup
    side, kind = workload.split("_")
    table = "bare_queue" if side == "bare" else "call_queue"
    _refill(db.url, table, n, user_id, template_id, max_slots)
    t0 = time.monotonic()
    with WaitSampler(db.url, db.name) as sampler:
        script = SCRIPTS[workload]
        if side == "bare" and async_commit[kind]:
            script = "BEGIN;\nSET LOCAL synchronous_commit = off;\n" + script + "COMMIT;\n"
        options = FLOOR_OPTIONS if side == "floor" else ""
        tx, failed, _ = _pgbench(db.url, script, clients, seconds, options)
    wall = time.monotonic() - t0
    r = ClaimResult(workload, clients, float(seconds), _count(db.url, table), tx, failed, n)
    r.waits = sampler.top()
    log(
        f"claim: {workload:12s} c={clients}: {r.rate:9.0f} rows/s "
        f"({tx} tx, {failed} failed, {wall:.1f}s wall"
        f"{', QUEUE EMPTIED' if r.exhausted else ''}) waits {r.waits}"
    )
    if side != "bare" and kind == "single":
        _check_consistency(db.url)
    return r


def _backend_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a server backend on this machine (None when it is not local)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def server_cpu_per_row(
    db: ScratchDB, setup: tuple[Any, ...], kind: str, floor: bool = False
) -> dict[str, float]:
    """Server CPU ms per claimed row of ours and of the bare claim (and of the floor, when
    ``floor``), one client, one backend: what bounds the throughput ratio on a machine whose
    cores are all busy."""
    user_id, template_id, max_slots, async_commit = setup
    runs = 1500 if kind == "single" else 60
    out: dict[str, float] = {}
    sides = ("bare", "ours", "floor") if kind == "single" and floor else ("bare", "ours")
    for side in sides:
        table = "bare_queue" if side == "bare" else "call_queue"
        _refill(
            db.url,
            table,
            runs * (1 if kind == "single" else 50) + 500,
            user_id,
            template_id,
            max_slots,
        )
        script = SCRIPTS[f"{side}_{kind}"].strip().rstrip(";")
        with psycopg.connect(db.url, autocommit=True) as conn:
            if side == "bare" and async_commit[kind]:
                conn.execute("SET synchronous_commit = off")
            if side == "floor":
                conn.execute("SET session_replication_role = replica")
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            before = _backend_cpu_seconds(int(row[0]))
            for _ in range(runs):
                conn.execute(script)
            after = _backend_cpu_seconds(int(row[0]))
        rows = _count(db.url, table)
        if before is None or after is None or not rows:
            return {}
        out[side] = (after - before) / rows * 1000
    log(f"claim: server CPU per claimed row, {kind}, one client: {out}")
    return out


def _ratio(ours: ClaimResult, bare: ClaimResult) -> dict[str, Any]:
    return {
        "ours": ours.rate,
        "bare": bare.rate,
        "ratio": ours.rate / bare.rate if bare.rate else float("nan"),
        "exhausted": ours.exhausted or bare.exhausted,
        "waits_ours": ours.waits,
        "waits_bare": bare.waits,
    }


def _ratios(results: list[ClaimResult], clients_list: tuple[int, ...]) -> dict[str, Any]:
    def find(workload: str, clients: int) -> ClaimResult | None:
        return next((r for r in results if (r.workload, r.clients) == (workload, clients)), None)

    ratios: dict[str, Any] = {}
    for kind in ("single", "batch"):
        for clients in clients_list:
            bare = find(f"bare_{kind}", clients)
            assert bare is not None
            for side, key in (("ours", kind), ("ourscaa", "caa1"), ("floor", "floor")):
                ours = find(f"{side}_{kind}", clients)
                if ours is not None:
                    ratios[f"{key}_c{clients}"] = _ratio(ours, bare)
    return ratios


def run(*, quick: bool = False, admin_url: str | None = None) -> dict[str, Any]:
    """Run the claim benchmark; returns a JSON-able dict with every figure."""
    seconds = 4 if quick else 10
    clients_list = (2, 8)
    # Rows per fill: well above what the workload can claim in ``seconds`` on this machine (a
    # queue emptied before the end caps the rate at the fill: the bare claim's is larger).
    fill = {
        f"{side}_{kind}": per_second * seconds
        for (side, kind), per_second in FILL_PER_SECOND.items()
    }
    # Enough free slots that assignment never starves: one per queued row, split over the two
    # providers (claim_and_assign_calls' cost grows with the free slots; see bench/FINDINGS.md).
    max_slots = max(fill["ours_single"], fill["ours_batch"]) // 2 + 1000
    db = ScratchDB(admin_url) if admin_url else ScratchDB()
    log(f"claim: scratch database {db.name}")
    db.create()
    results: list[ClaimResult] = []
    try:
        with psycopg.connect(db.url, autocommit=True) as conn:
            user_id, template_id = _setup(conn, max_slots)
            floor = _superuser(conn)
            # The bare baseline commits with the same durability as the functions it is
            # compared with (claim_and_assign_calls turns synchronous_commit off for itself).
            async_commit = {
                "batch": _sets_async_commit(conn, ("claim_and_assign_calls",)),
                "single": _sets_async_commit(
                    conn, ("claim_due_calls", "get_next_call_in_queue", "assign_call_to_provider")
                ),
            }
        notes = {
            k: ("synchronous_commit off, as ours" if v else "server default commit")
            for k, v in async_commit.items()
        }
        log(f"claim: bare baselines commit: {notes}")
        setup = (user_id, template_id, max_slots, async_commit)
        if not floor:
            log("claim: not a superuser here: the floor (no triggers) is not measured")
        for kind in ("single", "batch"):
            sides = ("bare", "ours", "ourscaa") if kind == "single" else ("bare", "ours")
            sides += ("floor",) if kind == "single" and floor else ()
            for clients in clients_list:
                for side in sides:
                    workload = f"{side}_{kind}"
                    r = _measure(db, workload, clients, seconds, fill[workload], setup)
                    results.append(r)
        cpu = {kind: server_cpu_per_row(db, setup, kind, floor) for kind in ("single", "batch")}
    finally:
        db.drop()
    return {
        "seconds_per_run": seconds,
        "runs": [r.__dict__ | {"rate": r.rate} for r in results],
        "ratios": _ratios(results, clients_list),
        "bare_commit": notes,
        "server_cpu_ms_per_row": cpu,
    }


def _superuser(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    return bool(row and row[0])


def _sets_async_commit(conn: psycopg.Connection[Any], names: tuple[str, ...]) -> bool:
    row = conn.execute(
        "SELECT bool_or(prosrc ILIKE '%%synchronous_commit%%') FROM pg_proc"
        " WHERE proname = ANY(%s) AND pronamespace = 'public'::regnamespace",
        (list(names),),
    ).fetchone()
    return bool(row and row[0])


def _check_consistency(url: str) -> None:
    """Every claimed row of ours has exactly one live assignment and a taken slot."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM call_queue WHERE status = 'assigned'),"
            " (SELECT count(*) FROM call_queue WHERE status = 'claimed'),"
            " (SELECT count(*) FROM call_assignments WHERE state = 'assigned'),"
            " (SELECT coalesce(sum(current_calls), 0) FROM provider_load)"
        ).fetchone()
    assert row is not None
    assigned, claimed, assignments, slots = (int(x) for x in row)
    if not (assigned == assignments == slots) or claimed:
        log(
            f"claim: INCONSISTENT after single claims: assigned={assigned} claimed={claimed}"
            f" assignments={assignments} slots={slots}"
        )


def slot_sensitivity(
    slots_list: tuple[int, ...] = (100, 10_000, 100_000), repeats: int = 15
) -> dict[str, float]:
    """Median ms of one ``claim_and_assign_calls(50)`` (one client) by free slots per provider."""
    out: dict[str, float] = {}
    db = ScratchDB()
    db.create()
    try:
        for slots in slots_list:
            with psycopg.connect(db.url, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS bare_queue")
                conn.execute(
                    "TRUNCATE call_queue, call_service_providers, provider_availability CASCADE"
                )
                user_id, template_id = _setup(conn, slots + 50 * (repeats + 3))
            _refill(db.url, "call_queue", 20_000, user_id, template_id, slots + 50 * (repeats + 3))
            times = []
            with psycopg.connect(db.url, autocommit=True) as conn:
                for _ in range(3):  # warm: plpgsql compile, plan cache
                    conn.execute("SELECT count(*) FROM claim_and_assign_calls(50, 'b', 60)")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    conn.execute("SELECT count(*) FROM claim_and_assign_calls(50, 'b', 60)")
                    times.append((time.perf_counter() - t0) * 1000)
            out[str(slots)] = sorted(times)[len(times) // 2]
            log(f"claim: {slots} free slots per provider: {out[str(slots)]:.1f} ms per claim of 50")
    finally:
        db.drop()
    return out


if __name__ == "__main__":
    import json
    import sys

    if "--slots" in sys.argv:
        print(json.dumps(slot_sensitivity(), indent=2))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
