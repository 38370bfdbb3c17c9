"""Campaigns with the running system: a real worker, notify worker and beat against the
simulator. Pause keeps a campaign's calls from being claimed while other calls go on; resume
brings them back; the in-flight limit holds; cancel stops what is not dialed and lets calls in
flight finish; every ended call is told to the app's endpoint, which fails at first."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from providers.simulator import Simulator
from tests.e2e.conftest import all_terminal, creates_by_queue, slots_held
from worker import notify
from worker.embedded import wait_until
from worker.fleet import Fleet
from worker.seed import Seeded, demo_phone

pytestmark = pytest.mark.e2e


class FlakyReceiver:
    """The app's endpoint: answers 503 to its first ``failures`` requests, then 200."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[str, bytes, int]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    code = 503 if len(outer.received) < outer.failures else 200
                    outer.received.append(
                        (self.headers.get(notify.SIGNATURE_HEADER, ""), body, code)
                    )
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> set[str]:
        with self.lock:
            return {json.loads(b)["data"]["queue_id"] for _, b, c in self.received if c == 200}


@pytest.fixture
def receiver() -> Iterator[FlakyReceiver]:
    r = FlakyReceiver(failures=3)
    yield r
    r.server.shutdown()
    r.server.server_close()


def _campaign(conn: psycopg.Connection[Any], seeded: Seeded, n: int, start: int, **kw: Any) -> Any:
    camp = conn.execute(
        "SELECT create_campaign(%s, %s, 'E2E', %s, NULL, NULL, NULL, %s)",
        (seeded.user_id, seeded.template_id, kw.get("status", "running"), kw.get("in_flight")),
    ).fetchone()
    assert camp is not None
    rows = [
        {"name": f"Customer {i}", "phone": demo_phone(i), "external_id": f"e2e-{i}"}
        for i in range(start, start + n)
    ]
    got = conn.execute(
        "SELECT queue_id FROM schedule_calls(%s, %s)", (camp[0], Jsonb(rows))
    ).fetchall()
    assert all(r[0] for r in got)
    return camp[0], [r[0] for r in got]


def _count(conn: psycopg.Connection[Any], query: str, params: Any) -> int:
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def test_pause_resume_cancel_pacing_and_notifications(
    conn: psycopg.Connection[Any],
    seeded: Seeded,
    sim: Simulator,
    fleet: Fleet,
    receiver: FlakyReceiver,
) -> None:
    sim.configure({"call_seconds": [0.4, 0.8]})
    paced, paced_ids = _campaign(conn, seeded, 10, 0, in_flight=2)
    # the other campaign waits as a draft; it runs while the first one is paused
    other, other_ids = _campaign(conn, seeded, 30, 100, status="draft", in_flight=3)
    secret = conn.execute(
        "SELECT secret FROM register_notification_endpoint(%s, %s, %s)",
        (seeded.user_id, receiver.url, paced),
    ).fetchone()[0]  # type: ignore[index]
    in_flight_sql = (
        "SELECT count(*) FROM call_queue WHERE campaign_id = %s"
        " AND status IN ('claimed', 'assigned', 'dialing', 'in_progress')"
    )
    fleet.env = {**fleet.env, "CALLQ_NOTIFY_ALLOW_PRIVATE": "true"}
    fleet.start_worker()
    fleet.start_worker("notify", queues="notify", concurrency=2)
    fleet.start_beat()

    # pause once a few of the paced campaign's calls ended; its calls in flight finish
    wait_until(
        lambda: _count(conn, "SELECT count(*) FROM call_queue WHERE id = ANY(%s) AND status ="
                       " 'completed'", (paced_ids,)) >= 3,
        timeout=90, what="three calls of the paced campaign completed",
    )  # fmt: skip
    assert conn.execute("SELECT pause_campaign(%s)", (paced,)).fetchone() == ("paused",)
    paused_at = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    wait_until(lambda: _count(conn, in_flight_sql, (paced,)) == 0, timeout=60, what="drained")
    assert conn.execute("SELECT resume_campaign(%s)", (other,)).fetchone() == ("running",)
    # the other campaign keeps being dialed meanwhile: the claim runs and skips the paused one
    assigned_after = (
        "SELECT count(*) FROM call_assignments a JOIN call_queue q ON q.id = a.queue_id"
        " WHERE q.campaign_id = %s AND a.assigned_at > %s"
    )
    wait_until(
        lambda: _count(conn, assigned_after, (other, paused_at)) >= 4,
        timeout=60, what="the other campaign dialed while the first is paused",
    )  # fmt: skip
    # cancel the other campaign: queued calls canceled, calls in flight finish
    assert conn.execute("SELECT cancel_campaign(%s)", (other,)).fetchone() == ("canceled",)
    canceled_at = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    resumed_at = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    assert _count(conn, assigned_after, (paced, paused_at)) == 0  # nothing claimed while paused
    assert conn.execute("SELECT resume_campaign(%s)", (paced,)).fetchone() == ("running",)

    wait_until(lambda: all_terminal(conn, paced_ids + other_ids), timeout=120, what="terminal")
    statuses = dict(
        conn.execute(
            "SELECT campaign_id, array_agg(DISTINCT status) FROM call_queue"
            " WHERE campaign_id IN (%s, %s) GROUP BY 1",
            (paced, other),
        ).fetchall()
    )
    assert statuses[paced] == ["completed"]
    assert "canceled" in statuses[other] and set(statuses[other]) <= {"completed", "canceled"}
    assert _count(conn, assigned_after, (other, canceled_at)) == 0  # nothing after the cancel
    assert _count(conn, assigned_after, (paced, resumed_at)) >= 1  # dialed again after resume
    # at most two calls of the paced campaign were ever on the line together
    spans = conn.execute(
        "SELECT a.assigned_at, coalesce(a.ended_at, now()) FROM call_assignments a"
        " JOIN call_queue q ON q.id = a.queue_id WHERE q.campaign_id = %s",
        (paced,),
    ).fetchall()
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap <= 2
    dials = creates_by_queue(sim)
    assert all(dials.get(str(q)) == 1 for q in paced_ids)  # never dialed twice
    assert slots_held(conn) == 0

    # every call of the paced campaign told to the app, although the endpoint failed at first
    wait_until(
        lambda: receiver.delivered() >= {str(q) for q in paced_ids},
        timeout=90, what="every call.ended event delivered",
    )  # fmt: skip
    assert [c for _, _, c in receiver.received][:3] == [503, 503, 503]
    for header, body, _ in receiver.received:
        assert notify.verify(secret, body, header)
        assert b"+1555" not in body and b"Customer" not in body
    progress = conn.execute(
        "SELECT calls, completed, answered, in_flight FROM call_campaign_progress"
        " WHERE campaign_id = %s",
        (paced,),
    ).fetchone()
    assert progress == (10, 10, 10, 0)
    logs = "".join(p.read_text(errors="replace") for p in fleet.log_dir.glob("*.log"))  # type: ignore[union-attr]
    assert "+1555" not in logs and "Customer " not in logs and secret not in logs
