"""The canary: personal data and keys appear in no log, broker message, Flower page or stored
error text.

A real worker, beat, webhook server and Flower run against the simulator. Calls carry a
distinctive name, number, e-mail, variable, script and transcript; some are busy or fail, one
provider has an outage, one call's completion hits a CHECK constraint (whose DETAIL would
print the whole row). Then every log file, every Redis key, Flower's task API and every error
column in the database are searched for the canary strings: zero hits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from psycopg import sql

from providers.simulator import Simulator, shapes
from tests.e2e.conftest import all_terminal
from worker.embedded import free_port, wait_for_port, wait_until
from worker.fleet import Fleet
from worker.seed import SIM_SYNTHFLOW_KEY, SIM_VAPI_KEY, Seeded

pytestmark = pytest.mark.e2e

NAME = "Zebulon Canarywing"
NUMBER = "+1555017743"  # + one digit per call
EMAIL = "zebulon.canarywing@example.com"
SCRIPT = "CANARY-SCRIPT-9023"
TRANSCRIPT = "CANARY-TRANSCRIPT-4417"
VARIABLE = "CANARY-VAR-5521"
HOOK_SECRET = "canary-webhook-secret-77"
CANARIES = [
    "Zebulon", "Canarywing", "5550177", EMAIL, SCRIPT, TRANSCRIPT, VARIABLE, HOOK_SECRET,
    SIM_VAPI_KEY, SIM_SYNTHFLOW_KEY, "Failing row",
]  # fmt: skip
TRAP_NUMBER = NUMBER + "9"  # its history row is refused by a CHECK constraint


def hits(blob: str) -> list[str]:
    return [c for c in CANARIES if c.lower() in blob.lower()]


def redis_dump(url: str) -> str:
    """Every key and value of the broker's Redis database, as text."""
    client = redis.Redis.from_url(url)
    parts: list[str] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        value: Any = b""
        if kind == "string":
            value = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1)
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


def stored_errors(conn: psycopg.Connection[Any]) -> str:
    """Every error-like text and JSON column of every table in the public schema."""
    columns = conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND data_type IN ('text', 'jsonb')"
        " AND column_name ~ '(error|detail|reason|message|outcome)'"
        " AND table_name IN (SELECT table_name FROM information_schema.tables"
        "   WHERE table_schema = 'public' AND table_type = 'BASE TABLE')"
    ).fetchall()
    assert any(c == "call_retries" for c, _ in columns)
    out = []
    for table, column in columns:
        rows = conn.execute(f'SELECT "{column}"::text FROM public."{table}"').fetchall()
        out += [f"{table}.{column}: {r[0]}" for r in rows if r[0]]
    return "\n".join(out)


def test_no_personal_data_or_key_anywhere(
    conn: psycopg.Connection[Any],
    seeded: Seeded,
    sim: Simulator,
    fleet: Fleet,
    broker_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shapes, "TRANSCRIPT", f"AI: Hello {NAME}. User: {TRANSCRIPT}.")
    hooks_port, flower_port = free_port(), free_port()
    sim.configure(
        {
            "outcomes_by_suffix": {"7431": "busy", "7432": "failed", "7433": "no_answer"},
            "outages": [{"start": 0, "end": 4, "mode": "500", "provider": "vapi"}],
            "webhook_url": f"http://127.0.0.1:{hooks_port}/webhooks/none",
            "synthflow_webhook_url": (
                f"http://127.0.0.1:{hooks_port}/webhooks/{seeded.provider_ids['synthflow']}"
            ),
            "webhook_secret": HOOK_SECRET,
        }
    )
    conn.execute("UPDATE call_service_providers SET webhook_secret = %s", (HOOK_SECRET,))
    conn.execute(
        "UPDATE call_templates SET script = script || %s, first_message = %s WHERE id = %s",
        (f" {SCRIPT}", "Hello {{recipient_name}}", seeded.template_id),
    )
    conn.execute(  # DDL takes no parameters: the number as a quoted literal
        sql.SQL(
            "ALTER TABLE call_history ADD CONSTRAINT canary_trap"
            " CHECK (recipient_phone <> {}) NOT VALID"
        ).format(sql.Literal(TRAP_NUMBER))
    )
    ids = [
        conn.execute(
            "SELECT schedule_call(%s, %s, %s, %s, %s, now(), 5, %s, %s)",
            (
                seeded.user_id, seeded.template_id, NAME, f"{NUMBER}{i}", EMAIL,
                json.dumps({"company_name": VARIABLE}), json.dumps({"note": NAME}),
            ),
        ).fetchone()[0]  # type: ignore[index]
        for i in range(10)
    ]  # fmt: skip
    trap = ids[9]

    fleet.env = {
        **fleet.env,
        "FLOWER_UNAUTHENTICATED_API": "true",
        "CALLQ_WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{hooks_port}",
    }
    fleet.start(
        "webhooks",
        [sys.executable, "-m", "worker.cli", "webhooks", "--port", str(hooks_port)],
    )
    fleet.start(
        "flower",
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={flower_port}",
         "--address=127.0.0.1"],
    )  # fmt: skip
    wait_for_port(flower_port, 60)
    wait_for_port(hooks_port, 60)
    fleet.start_worker()
    fleet.start_beat()

    others = [i for i in ids if i != trap]
    wait_until(lambda: all_terminal(conn, others), timeout=150, what="every call but the trap")
    base = f"http://127.0.0.1:{flower_port}"

    def trap_failed_in_flower() -> dict[str, Any]:
        tasks: dict[str, Any] = httpx.get(f"{base}/api/tasks", timeout=10).json()
        failed = [t for t in tasks.values() if t.get("state") == "FAILURE"]
        return tasks if failed else {}

    tasks = wait_until(trap_failed_in_flower, timeout=90, interval=1.0, what="a failed task")
    for task_id, task in tasks.items():
        if task.get("state") == "FAILURE":
            info = httpx.get(f"{base}/api/task/info/{task_id}", timeout=10).json()
            assert "SQLSTATE 23514" in json.dumps(info)  # what is left of the CHECK violation
            tasks[task_id] = info

    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log")}
    assert {"worker.log", "beat.log", "webhooks.log", "flower.log"} <= set(logs)
    assert "webhook.acted" in logs["webhooks.log"] or "webhook" in logs["webhooks.log"]
    found = {name: hits(text) for name, text in logs.items()}
    found["redis"] = hits(redis_dump(broker_url))
    found["flower"] = hits(json.dumps(tasks))
    errors = stored_errors(conn)
    assert errors  # failures were provoked and stored
    found["database errors"] = hits(errors)
    assert {k: v for k, v in found.items() if v} == {}
