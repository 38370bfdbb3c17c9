"""A whole callq system on this machine for one benchmark or drill, started and stopped by us.

Scratch database on the machine's PostgreSQL (or a PostgreSQL of our own), a Redis of our own,
the simulator as a child process (or in-process), real worker and beat processes via
:class:`worker.fleet.Fleet`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench.common import (
    ADMIN_URL,
    OwnPgbouncer,
    OwnPostgres,
    ScratchDB,
    Simulator,
    fleet_env,
    own_redis,
)
from worker.embedded import wait_until
from worker.seed import daytime_zone

TERMINAL = ("completed", "failed", "canceled")
IN_FLIGHT = ("claimed", "assigned", "dialing", "in_progress")

SIM_INSTANT = {
    "seed": 1,
    "outcome_mix": {"completed": 1.0},
    "answer_at_once": True,
    "call_seconds": 0,
    "queue_seconds": 0,
    "ring_seconds": 0,
    "latency_ms": 0,
    "record_times": True,
}


@dataclass
class Stack:
    """Database + own Redis + simulator + fleet; :meth:`stop` undoes everything it started."""

    sim_config: dict[str, Any] = field(default_factory=lambda: dict(SIM_INSTANT))
    env_overrides: dict[str, Any] = field(default_factory=dict)
    max_concurrent_calls: int = 1000
    own_postgres: bool = False
    webhook_secret: str | None = None  # set on the seeded providers (webhooks on)
    admin_url: str | None = None
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="callq-bench-")))
    keep_logs: bool = False
    # The fleet talks through a pgbouncer of ours in transaction mode; LISTEN then goes over
    # the direct URL when listen_direct, else it is off.
    pooler: bool = False
    listen_direct: bool = True
    bouncer: OwnPgbouncer | None = None

    db: ScratchDB | None = None
    pg: OwnPostgres | None = None
    redis: Any = None
    sim: Simulator | None = None
    fleet: Any = None
    seeded: Any = None
    url: str = ""
    # the recipients' zone: where it is daytime now (calling rules: 08:00-21:00 local)
    zone: str = field(default_factory=daytime_zone)

    def start(self) -> Stack:
        from worker.fleet import Fleet
        from worker.seed import seed_demo

        try:
            if self.own_postgres:
                self.pg = OwnPostgres()
                admin = self.pg.start()
                self.db = ScratchDB(admin)
            else:
                self.db = ScratchDB(self.admin_url) if self.admin_url else ScratchDB()
            self.db.create()
            self.url = self.db.url
            self.redis = own_redis()
            self.sim = Simulator(log_path=self.log_dir / "simulator.log")
            self.sim.start(self.sim_config)
            with self.connect() as conn:
                # Retry back-offs in seconds rather than minutes (drills with failures).
                conn.execute("UPDATE ops_settings SET retry_delay_scale = 0.002")
                self.seeded = seed_demo(
                    conn,
                    sim_base_url=self.sim.base_url,
                    max_concurrent_calls=self.max_concurrent_calls,
                    webhook_secret=self.webhook_secret,
                )
            fleet_url, overrides = self.url, dict(self.env_overrides)
            if self.pooler:
                self.bouncer = OwnPgbouncer(self.db.admin_url or ADMIN_URL).start()
                fleet_url = self.bouncer.url(self.db.name)
                if self.listen_direct:
                    overrides["CALLQ_LISTEN_DATABASE_URL"] = self.url
            env = fleet_env(fleet_url, self.redis.url, **overrides)
            self.fleet = Fleet(env=env, log_dir=self.log_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def stop(self) -> None:
        if self.fleet is not None:
            with contextlib.suppress(Exception):
                self.fleet.stop()
        if self.sim is not None:
            self.sim.stop()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
            shutil.rmtree(self.redis.datadir, ignore_errors=True)
        if self.bouncer is not None:
            self.bouncer.stop()
        if self.db is not None:
            self.db.drop()
        if self.pg is not None:
            self.pg.destroy()
        if not self.keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scheduling ------------------------------------------------------------------------------

    def schedule(
        self, count: int, *, start: int = 0, delay_seconds: float = 0.0, suffix: str | None = None
    ) -> list[uuid.UUID]:
        """``count`` calls through ``schedule_call`` in one transaction (one NOTIFY at commit)."""
        from worker.seed import schedule_calls

        with self.connect() as conn:
            return schedule_calls(
                conn,
                self.seeded,
                count,
                start=start,
                delay_seconds=delay_seconds,
                suffix=suffix,
                timezone=self.zone,
            )

    def schedule_one(self, conn: psycopg.Connection[Any], i: int) -> tuple[str, float]:
        """One call due now, autocommit; returns (queue id, wall time right after the commit)."""
        row = conn.execute(
            "SELECT schedule_call(%s, %s, %s, %s, NULL, NULL, 5, %s, '{}'::jsonb, NULL, %s)",
            (
                self.seeded.user_id,
                self.seeded.template_id,
                f"Customer {i}",
                f"+1555{(i // 10000) % 1000:03d}{i % 10000:04d}",
                '{"company_name": "Acme"}',
                self.zone,
            ),
        ).fetchone()
        t = time.time()
        assert row is not None
        return str(row[0]), t

    def one_at_a_time(
        self,
        schedule: Callable[[psycopg.Connection[Any], int], tuple[str, float]],
        count: int,
        gap: float,
        *,
        strict: bool = True,
    ) -> dict[str, float]:
        """``count`` calls, each scheduled by ``schedule(conn, i)`` (queue id, commit time) once
        the one before reached the simulator (a wait of at most 10 s; ``strict``: a call not
        placed by then is an error) and ``gap`` seconds passed. Returns each call's commit time.
        """
        assert self.sim is not None
        sim = self.sim
        commits: dict[str, float] = {}
        with self.connect() as conn:
            for i in range(count):
                before = sim.stats()["total_creates"]
                qid, t = schedule(conn, i)
                commits[qid] = t
                try:
                    wait_until(lambda b=before: sim.stats()["total_creates"] > b, timeout=10)  # type: ignore[misc]
                except TimeoutError:
                    if strict:
                        raise
                time.sleep(gap)  # pacing: the calls come apart, not a wait for anything
        return commits

    def warm_up(self, *, suffix: str | None = None, timeout: float = 90.0) -> None:
        """One call through the whole path: the fleet is up (instead of a fixed warm-up sleep).

        ``suffix`` picks a simulator outcome rule for the probe (one that ends it at once)."""
        [probe] = self.schedule(1, start=999_999, suffix=suffix)
        wait_until(lambda: self.settled([probe]), timeout=timeout, what="the warm-up call's end")

    # -- counting --------------------------------------------------------------------------------

    def counts(self, ids: list[Any] | None = None) -> dict[str, Any]:
        """scheduled, terminal, queued, lost, dialed more than once, slots held, statuses."""
        with self.connect() as conn:
            if ids is None:
                rows = conn.execute("SELECT id::text, status FROM call_queue").fetchall()
            else:
                rows = conn.execute(
                    "SELECT id::text, status FROM call_queue WHERE id = ANY(%s)", (list(ids),)
                ).fetchall()
            slots = conn.execute(
                "SELECT coalesce(sum(current_calls), 0) FROM provider_load"
            ).fetchone()
            live = conn.execute(
                "SELECT count(*) FROM call_assignments WHERE state IN ('assigned','dialing',"
                "'placed')"
            ).fetchone()
        by_status: dict[str, int] = {}
        for _, status in rows:
            by_status[status] = by_status.get(status, 0) + 1
        assert self.sim is not None
        dials = self.sim.stats().get("creates_by_queue", {})
        wanted = {qid for qid, _ in rows}
        twice = sorted(q for q, n in dials.items() if n > 1 and q in wanted)
        scheduled = len(ids) if ids is not None else len(rows)
        terminal = sum(by_status.get(s, 0) for s in TERMINAL)
        queued = by_status.get("queued", 0)
        return {
            "scheduled": scheduled,
            "terminal": terminal,
            "queued": queued,
            "in_flight": sum(by_status.get(s, 0) for s in IN_FLIGHT),
            "lost": scheduled - terminal - queued,
            "dialed_more_than_once": len(twice),
            "dialed_twice_ids": twice[:10],
            "slots_held": int(slots[0]) if slots else -1,
            "live_assignments": int(live[0]) if live else -1,
            "by_status": by_status,
            "dialed": sum(1 for q in wanted if dials.get(q, 0) >= 1),
            "missing_rows": scheduled - len(rows),
        }

    def settled(self, ids: list[Any]) -> bool:
        """Every call terminal and no slot held (database only: cheap to poll)."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM call_queue WHERE id = ANY(%s)"
                " AND status IN ('completed', 'failed', 'canceled')),"
                " (SELECT coalesce(sum(current_calls), 0) FROM provider_load)",
                (list(ids),),
            ).fetchone()
        return row is not None and int(row[0]) == len(ids) and int(row[1]) == 0

    def wait_settled(self, ids: list[Any], timeout: float) -> tuple[bool, float]:
        """(settled, seconds waited): every call terminal and no slot held, or the timeout."""
        t0 = time.monotonic()
        try:
            wait_until(lambda: self.settled(ids), timeout=timeout, interval=0.5)
        except TimeoutError:
            return False, time.monotonic() - t0
        return True, time.monotonic() - t0

    def consumers(self) -> int:
        """Broker connections waiting on a queue (a running worker holds one)."""
        client = redis.Redis.from_url(self.redis.url)
        try:
            return sum(1 for c in client.client_list() if c.get("cmd") in ("brpop", "blpop"))
        finally:
            client.close()

    def listeners(self) -> int:
        """Database sessions listening for due calls: one per fleet (the worker holding the
        listener lock), or one per beat with ``CALLQ_LISTEN_IN=beat``."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND query ILIKE 'LISTEN %%'"
            ).fetchone()
        return int(row[0]) if row else 0

    def wait_ready(self, *, workers: int = 1, listeners: int = 1, timeout: float = 60.0) -> None:
        """Until ``workers`` workers consume from the broker and ``listeners`` sessions listen
        (instead of a fixed warm-up sleep)."""
        wait_until(
            lambda: self.consumers() >= workers and self.listeners() >= listeners,
            timeout=timeout,
            interval=0.1,
            what=f"{workers} worker(s) consuming and {listeners} listener(s)",
        )

    def diagnose(self, ids: list[Any], limit: int = 10) -> list[dict[str, Any]]:
        """The calls that are not terminal: queue row, latest assignment, creates seen."""
        assert self.sim is not None
        dials = self.sim.stats().get("creates_by_queue", {})
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT q.id::text, q.status, q.attempts, q.lease_expires_at < now() AS lease_over,"
                " q.claimed_by, q.last_error, a.state, a.provider_call_id IS NOT NULL,"
                " a.poll_count, a.next_poll_at < now() AS poll_overdue, a.updated_at"
                " FROM call_queue q LEFT JOIN LATERAL (SELECT * FROM call_assignments a"
                "  WHERE a.queue_id = q.id ORDER BY a.created_at DESC LIMIT 1) a ON true"
                " WHERE q.id = ANY(%s) AND q.status NOT IN ('completed','failed','canceled')"
                " LIMIT %s",
                (list(ids), limit),
            ).fetchall()
        keys = (
            "queue_id",
            "status",
            "attempts",
            "lease_over",
            "claimed_by",
            "last_error",
            "assignment_state",
            "has_provider_call_id",
            "poll_count",
            "poll_overdue",
            "assignment_updated_at",
        )
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["creates_seen"] = dials.get(d["queue_id"], 0)
            d["assignment_updated_at"] = str(d["assignment_updated_at"])
            out.append(d)
        return out

    def tail_logs(self, lines: int = 20) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(out)
