"""``callq demo``: the whole system on one machine, against the provider simulator.

Applies migrations, seeds a user, plan, template and three providers (Vapi, SynthFlow, Retell),
creates a campaign, registers a notification endpoint (a receiver in this process that checks
each signature), uploads the campaign's contacts with one ``schedule_calls`` (some now, some
later, mixed priorities, one invalid row to show a per-row error), runs a real Celery worker, a
notify worker and beat, pauses and resumes the campaign once, prints live progress and ends with
a summary by status and provider, the campaign's progress and the notifications received. With
no DATABASE_URL or broker URL configured it starts an embedded PostgreSQL and Redis and stops
them at the end.

The fictional numbers (+1555...) could be anywhere in the +1 zones, so each row names its
recipient's zone: one where it is afternoon now, and for one or two calls one where it is night
(:func:`worker.seed.night_zone`). The calling window holds those (they stay queued until the
local opening), as an illustration; the demo does not wait for them to be dialed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.types.json import Jsonb

from models.migrate import upgrade
from models.session import connect
from providers.simulator import Simulator
from worker.embedded import EmbeddedServices
from worker.fleet import Fleet
from worker.notify import SIGNATURE_HEADER, verify
from worker.seed import daytime_zone, demo_phone, night_zone, seed_demo
from worker.settings import get_settings
from worker.status import campaigns_report, format_table

TERMINAL = ("completed", "failed", "canceled")
DEMO_PROVIDERS = ("vapi", "synthflow", "retell")
# Outcomes the simulator gives each call: mostly answered, some busy / no answer / voicemail.
DEMO_SIM_CONFIG: dict[str, Any] = {
    "outcome_mix": {
        "completed": 0.7,
        "busy": 0.1,
        "no_answer": 0.1,
        "voicemail": 0.05,
        "failed": 0.05,
    },
    "call_seconds": [1.0, 4.0],
    "ring_seconds": 0.5,
}
# Fast demo settings: tick every second, poll calls often, retry unanswered calls after seconds.
DEMO_ENV = {
    "CALLQ_POLL_INTERVAL_SECONDS": "1",
    "CALLQ_TRACK_INITIAL_DELAY_SECONDS": "0.5",
    "CALLQ_TRACK_MAX_DELAY_SECONDS": "2",
    "CALLQ_RECONCILE_DELAY_SECONDS": "1",
    "CALLQ_HEALTH_INTERVAL_SECONDS": "5",
    "CALLQ_REAPER_INTERVAL_SECONDS": "5",
    "CALLQ_LOG_LEVEL": "WARNING",
}


@contextmanager
def services() -> Iterator[tuple[str, str]]:
    """The configured database and broker URLs, or embedded ones for the duration."""
    s = get_settings()
    embedded = EmbeddedServices()
    try:
        db = s.database_url or _say("starting embedded PostgreSQL", embedded.database_url)
        broker = s.broker_url or _say("starting embedded Redis", embedded.broker_url)
        yield db, broker
    finally:
        embedded.stop()


def run_demo(*, calls: int = 40, timeout: float = 180.0, seed: int = 7, keep: bool = False) -> int:
    """Run the demo; 0 when every call reached a terminal state in time. ``keep``: leave the
    stack running after the summary, with Flower and the metrics endpoint, until Ctrl-C."""
    with services() as (db_url, broker_url), Receiver() as receiver:
        applied = upgrade(db_url)
        print(f"migrations: {len(applied)} applied")
        sim = Simulator(config={**DEMO_SIM_CONFIG, "seed": seed})
        sim.start(port=0)
        fleet = Fleet(
            env={
                "DATABASE_URL": db_url,
                "CALLQ_BROKER_URL": broker_url,
                # the simulator is not an official provider host: ops allow it explicitly
                "CALLQ_PROVIDER_ALLOWED_HOSTS": sim.base_url,
                # the demo's receiver listens on loopback: ops allow private addresses here
                "CALLQ_NOTIFY_ALLOW_PRIVATE": "true",
                "CALLQ_NOTIFY_INTERVAL_SECONDS": "0.5",
                **DEMO_ENV,
            },
            log_dir=Path(
                os.environ.get("CALLQ_DEMO_LOGS") or tempfile.mkdtemp(prefix="callq-demo-logs-")
            ),
        )
        try:
            with connect(db_url, pooled=get_settings().database_pooler, autocommit=True) as conn:
                _retry_fast(conn)
                seeded = seed_demo(
                    conn, sim_base_url=sim.base_url, providers=DEMO_PROVIDERS,
                    max_concurrent_calls=8,
                )  # fmt: skip
                campaign = _one(
                    conn,
                    "SELECT create_campaign(%s, %s, 'Demo campaign', 'draft')",
                    (seeded.user_id, seeded.template_id),
                )
                receiver.secret = _one(
                    conn,
                    "SELECT secret FROM register_notification_endpoint(%s, %s, %s)",
                    (seeded.user_id, receiver.url, campaign),
                )
                ids, night = _upload(conn, campaign, calls, random.Random(seed))
                print(
                    f"scheduled {len(ids)} calls (some now, some in 5-20 s, priorities 1-9;"
                    f" {len(night)} where it is night now)"
                )
                _one(conn, "SELECT resume_campaign(%s)", (campaign,))
                fleet.start_worker()
                fleet.start_worker("notify", queues="notify", concurrency=4)
                fleet.start_beat()
                ok = _watch(conn, ids, night, timeout, campaign)
                print()
                print(summary(conn, ids))
                print(held_line(conn, night))
                print(f"\nsimulator: {sim.stats().get('total_creates', 0)} create requests")
                print("\nCampaign progress")
                print(campaigns_report(conn, all_=True))
                print(_notifications(conn, receiver, len(ids) - len(night)))
            if keep:
                _keep_running(fleet, db_url)
            return 0 if ok else 1
        finally:
            fleet.stop()
            sim.stop()


def _keep_running(fleet: Fleet, db_url: str) -> None:
    """Start Flower and the metrics endpoint, say where they are, and wait for Ctrl-C."""
    flower_port, metrics_port = free_port(), free_port()
    cli = [sys.executable, "-m", "worker.cli"]
    fleet.start("flower", [*cli, "flower", f"--port={flower_port}", "--address=127.0.0.1"])
    fleet.start("metrics", [*cli, "metrics", "--host", "127.0.0.1", "--port", str(metrics_port)])
    print(
        "\nThe stack keeps running (worker, beat, simulator, Flower, metrics). Ctrl-C stops it.\n"
        f"  Flower:   http://127.0.0.1:{flower_port}\n"
        f"  metrics:  http://127.0.0.1:{metrics_port}/metrics\n"
        f"  queue:    DATABASE_URL='{db_url}' callq queue",
        flush=True,
    )
    # Ctrl-C (or a SIGTERM) only sets an event: a KeyboardInterrupt raised in the middle of
    # Popen.poll() can leave that child's wait lock taken, and stopping the fleet then waits
    # out every timeout for it.
    stop = threading.Event()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in handled}
    try:
        while not stop.wait(0.5):
            if any(p.poll() is not None for p in fleet.procs.values()):
                print("a process of the stack exited; stopping", file=sys.stderr, flush=True)
                return
        print("\nstopping...", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _retry_fast(conn: psycopg.Connection[Any]) -> None:
    """Make handle_failed_call's backoff seconds instead of minutes for this demo database
    (a table row, not a database setting: hosted Supabase refuses those, and a pooler loses a
    session's)."""
    conn.execute("UPDATE ops_settings SET retry_delay_scale = 0.01, updated_at = now()")


def night_calls(calls: int) -> int:
    """How many of the demo's calls go where it is night: two, one in a demo of 3-9 calls,
    none below."""
    return 0 if calls < 3 else 1 if calls < 10 else 2


def _upload(
    conn: psycopg.Connection[Any], campaign: Any, calls: int, rng: random.Random
) -> tuple[list[Any], list[Any]]:
    """The campaign's contacts in one schedule_calls, plus one invalid row: the queued ids, and
    those of the calls where it is night now."""
    now = datetime.now(UTC)
    day, night = daytime_zone(now), night_zone(now)
    first_night = calls - night_calls(calls)
    rows: list[dict[str, Any]] = []
    for i in range(calls):
        later = i < first_night and rng.random() < 0.3
        rows.append(
            {
                "name": f"Customer {i}",
                "phone": demo_phone(i),
                "priority": rng.randint(1, 9),
                "scheduled_time": (now + timedelta(seconds=rng.uniform(5, 20))).isoformat()
                if later
                else None,
                "variables": {"company_name": "Acme Inc"},
                "metadata": {"source": "demo", "n": i},
                "external_id": f"demo-{i}",
                "timezone": day if i < first_night else night,
            }
        )
    rows.append({"name": "Typo", "phone": "555-0100", "external_id": "demo-typo"})
    result = conn.execute(
        "SELECT idx, queue_id, sqlstate, message FROM schedule_calls(%s, %s)",
        (campaign, Jsonb(rows)),
    ).fetchall()
    for idx, _, code, message in result:
        if code:
            print(f"row {idx} rejected: {code} {message}")
    ids = [r[1] for r in result if r[1] is not None]
    held = conn.execute(
        "SELECT id FROM call_queue WHERE id = ANY(%s) AND recipient_timezones = ARRAY[%s]",
        (ids, night),
    ).fetchall()
    return ids, [r[0] for r in held]


def _notifications(conn: psycopg.Connection[Any], receiver: Receiver, calls: int) -> str:
    """Wait (briefly) for every call.ended event; say how many arrived, all signed."""
    deadline = time.monotonic() + 30
    while len(receiver.delivered) < calls and time.monotonic() < deadline:
        time.sleep(0.2)
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) FROM call_notifications"
    ).fetchone()
    assert row is not None
    return (
        f"\nnotifications: {len(receiver.delivered)} call.ended events received for {calls} calls,"
        f" {receiver.bad_signatures} with a bad signature; delivery log: {row[0]} of {row[1]}"
        " delivered"
    )


class Receiver:
    """The app's endpoint, on loopback: counts events whose Callq-Signature verifies."""

    def __init__(self) -> None:
        self.secret = ""
        self.delivered: set[str] = set()
        self.bad_signatures = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if verify(outer.secret, body, self.headers.get(SIGNATURE_HEADER, "")):
                    outer.delivered.add(json.loads(body)["data"]["queue_id"])
                    self.send_response(204)
                else:
                    outer.bad_signatures += 1
                    self.send_response(400)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callq-events"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _watch(
    conn: psycopg.Connection[Any], ids: list[Any], night: list[Any], timeout: float, campaign: Any
) -> bool:
    """Print a progress line whenever the counts change; pause the campaign once a quarter of
    its calls ended and resume it 3 s later; True once every call is terminal but the night
    ones, and those are held by the calling window (queued, ``hold_reason`` set)."""
    day = len(ids) - len(night)
    deadline = time.monotonic() + timeout
    last = ""
    paused_at: float | None = None
    resumed = False
    while True:
        counts = dict(
            conn.execute(
                "SELECT status, count(*) FROM call_queue WHERE id = ANY(%s) GROUP BY status",
                (ids,),
            ).fetchall()
        )
        line = "  ".join(f"{k}={counts[k]}" for k in sorted(counts))
        if line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        done = sum(counts.get(k, 0) for k in TERMINAL)
        if paused_at is None and done >= day // 4:
            conn.execute("SELECT pause_campaign(%s)", (campaign,))
            paused_at = time.monotonic()
            print(f"[{time.strftime('%H:%M:%S')}] campaign paused (calls in flight finish)")
        elif paused_at is not None and not resumed and time.monotonic() - paused_at > 3:
            conn.execute("SELECT resume_campaign(%s)", (campaign,))
            resumed = True
            print(f"[{time.strftime('%H:%M:%S')}] campaign resumed")
        held = _held(conn, night)
        if done == day and len(held) == len(night) and resumed:
            return True
        if time.monotonic() > deadline:
            print(
                f"timed out with {day - done} calls not terminal"
                f" and {len(night) - len(held)} night calls not held",
                file=sys.stderr,
            )
            return False
        time.sleep(0.5)


def summary(conn: psycopg.Connection[Any], ids: list[Any]) -> str:
    """Calls by final status and provider, with attempts, minutes and cost."""
    rows = conn.execute(
        """
        SELECT q.status, coalesce(h.status, '-') AS outcome, coalesce(p.name, '-') AS provider,
               count(*) AS calls,
               sum(q.attempts) AS attempts, coalesce(sum(h.duration_seconds), 0) AS seconds,
               coalesce(sum(h.cost), 0) AS cost
        FROM call_queue q
        LEFT JOIN call_history h ON h.queue_id = q.id
        LEFT JOIN call_service_providers p ON p.id = h.provider_id
        WHERE q.id = ANY(%s)
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        """,
        (ids,),
    ).fetchall()
    slots = conn.execute("SELECT coalesce(sum(current_calls), 0) FROM provider_load")
    held = slots.fetchone()
    table = format_table(
        ["status", "outcome", "provider", "calls", "attempts", "seconds", "cost $"], rows
    )
    return f"Summary\n{table}\nprovider slots still held: {held[0] if held else 0}"


def _held(conn: psycopg.Connection[Any], ids: list[Any]) -> list[tuple[Any, ...]]:
    """Of these calls, those a rule holds: (hold reason, until, zones) of each."""
    if not ids:
        return []
    return conn.execute(
        "SELECT hold_reason, scheduled_time, recipient_timezones FROM call_queue"
        " WHERE id = ANY(%s) AND status = 'queued' AND hold_reason IS NOT NULL"
        " ORDER BY scheduled_time",
        (ids,),
    ).fetchall()


def held_line(conn: psycopg.Connection[Any], ids: list[Any]) -> str:
    """The summary's line on the calls a rule holds, with their local opening."""
    held = _held(conn, ids)
    if not held:
        return "held by a calling rule: 0 calls"
    reason, until, zones = held[0]
    zone = (zones or ["UTC"])[0]
    local = until.astimezone(ZoneInfo(zone))
    return (
        f"held by a calling rule: {len(held)} calls ({reason}) until {local:%H:%M}"
        f" {zone} ({until.astimezone(UTC):%Y-%m-%d %H:%M} UTC)"
    )


def _one(conn: psycopg.Connection[Any], query: str, params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _say(message: str, start: Any) -> str:
    print(f"{message}...", flush=True)
    return str(start())
