"""``callq metrics``: what the collector reads from the database, the alert rules (checked by
promtool) and the Grafana dashboard (every query names metrics the collector exports)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import psycopg
from prometheus_client import generate_latest

from worker.metrics import CallqCollector
from worker.seed import schedule_calls, seed_demo

from .dbutil import one

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "ops" / "grafana" / "callq-dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _samples(collector: CallqCollector) -> dict[str, float]:
    text = generate_latest(collector.registry).decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_collector_reads_the_database(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        seeded = seed_demo(conn, sim_base_url="http://127.0.0.1:9", max_concurrent_calls=4)
        due = schedule_calls(conn, seeded, 3)
        schedule_calls(conn, seeded, 2, delay_seconds=3600, start=10)
        conn.execute(
            "UPDATE call_queue SET scheduled_time = now() - interval '90 seconds' WHERE id = %s",
            (due[0],),
        )
        vapi = seeded.provider_ids["vapi"]
        conn.execute(
            "UPDATE provider_availability SET consecutive_failures = 5,"
            " circuit_open_until = now() + interval '30 s' WHERE provider_id = %s",
            (vapi,),
        )
        collector = CallqCollector(db_url)
        first = _samples(collector)  # counters start here
        assert first['callq_queue_calls{status="queued"}'] == 5
        assert first["callq_queue_due_calls"] == 3
        assert 89 <= first["callq_oldest_due_call_age_seconds"] < 200
        name = one(conn, "SELECT name FROM call_service_providers WHERE id = %s", (vapi,))
        assert first[f'callq_provider_circuit_open{{provider="{name}"}}'] == 1
        assert first[f'callq_provider_consecutive_failures{{provider="{name}"}}'] == 5
        assert first[f'callq_provider_slots_free{{provider="{name}"}}'] == 4

        # one call through to completion: the counters move once the events settle
        synthflow = seeded.provider_ids["synthflow"]
        aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (due[1], synthflow))
        one(conn, "SELECT mark_call_dialing(%s)", (aid,))
        one(conn, "SELECT mark_call_placed(%s, 'pc-1')", (aid,))
        one(conn, "SELECT complete_call(%s, 12)", (aid,))
        conn.execute("UPDATE call_events SET created_at = created_at - interval '10 s'")
        after = _samples(collector)
        sname = one(conn, "SELECT name FROM call_service_providers WHERE id = %s", (synthflow,))
        assert after[f'callq_calls_ended_total{{outcome="completed",provider="{sname}"}}'] == 1
        assert after['callq_calls_finished_total{status="completed"}'] == 1
        assert after["callq_schedule_to_create_seconds_count"] == 1
        assert after['callq_queue_calls{status="queued"}'] == 4


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_dashboard_and_rules_use_only_exported_metrics(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        seed_demo(conn, sim_base_url="http://127.0.0.1:9")
    exported = {
        re.sub(r"(_total|_bucket|_count|_sum|_created)$", "", n.split("{")[0])
        for n in _samples(CallqCollector(db_url, ping=lambda: 1))
    }
    exported |= {"callq_calls_ended", "callq_calls_finished", "callq_schedule_to_create_seconds"}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += re.findall(r"expr: (?:>-\n)?(.+?)\n\s+for:", ALERTS.read_text(), re.S)
    used = set()
    for expr in exprs:
        used |= {re.sub(r"(_total|_bucket)$", "", m) for m in re.findall(r"callq_[a-z_]+", expr)}
    assert used and used <= exported, used - exported
