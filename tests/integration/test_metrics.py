"""``callq metrics``: what the collector reads from the database, the alert rules (checked by
promtool) and the Grafana dashboard (every query names metrics the collector exports)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from worker import metrics
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

        # one call through to completion: the counters move at the next scrape
        synthflow = seeded.provider_ids["synthflow"]
        aid = one(conn, "SELECT assign_call_to_provider(%s, %s)", (due[1], synthflow))
        one(conn, "SELECT mark_call_dialing(%s)", (aid,))
        one(conn, "SELECT mark_call_placed(%s, 'pc-1')", (aid,))
        one(conn, "SELECT complete_call(%s, 12)", (aid,))
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


def _finished(collector: CallqCollector) -> float:
    """A scrape: the collector reads the database, then the completed counter is read."""
    value = collector.registry.get_sample_value(
        "callq_calls_finished_total", {"status": "completed"}
    )
    return value or 0.0


INSERT_EVENT = "INSERT INTO call_events (queue_id, user_id, kind) VALUES (%s, %s, %s)"
OPS = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 2), st.sampled_from(["completed", "claimed"])),
    st.tuples(st.sampled_from(["commit", "rollback"]), st.integers(0, 2), st.just("")),
    st.tuples(st.just("scrape"), st.just(0), st.just("")),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, max_size=30))
def test_every_committed_event_is_counted_once_whatever_the_commit_order(
    db_url: str, ops: list[tuple[str, int, str]]
) -> None:
    """Three writers insert events, commit and roll back in any interleaving while scrapes
    run between their steps. Ids are taken at insert, so a scrape sees a higher id before a
    lower one commits: each scrape counts at most what has committed, and once every writer
    is done, exactly that (a counter that moved past a lower id would miss it for good)."""
    user = uuid.uuid4()
    collector = CallqCollector(db_url)
    _finished(collector)  # the counters start here
    writers = [psycopg.connect(db_url) for _ in range(3)]
    pending = [0, 0, 0]
    committed = 0
    try:
        for op, k, kind in ops:
            if op == "insert":
                writers[k].execute(INSERT_EVENT, (uuid.uuid4(), user, kind))
                pending[k] += kind == "completed"
            elif op == "commit":
                writers[k].commit()
                committed, pending[k] = committed + pending[k], 0
            elif op == "rollback":
                writers[k].rollback()
                pending[k] = 0
            else:
                assert _finished(collector) <= committed
        for k, writer in enumerate(writers):
            writer.commit()
            committed, pending[k] = committed + pending[k], 0
        assert _finished(collector) == committed
        assert _finished(collector) == committed  # and no event twice at a later scrape
    finally:
        for writer in writers:
            writer.close()


def test_gaps_are_bounded_and_forgotten(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids a rolled-back insert took are never seen: the collector keeps the newest
    ``MAX_GAPS`` of them and forgets them after ``GAP_SECONDS``, while a later commit below
    the newest read still counts."""
    monkeypatch.setattr(metrics, "MAX_GAPS", 4)
    user = uuid.uuid4()
    collector = CallqCollector(db_url)
    _finished(collector)

    def insert(conn: psycopg.Connection[Any], n: int) -> None:
        for _ in range(n):
            conn.execute(INSERT_EVENT, (uuid.uuid4(), user, "completed"))

    with psycopg.connect(db_url) as late, psycopg.connect(db_url) as other:
        insert(other, 10)
        other.rollback()
        insert(late, 1)  # the newest gap, committed below
        insert(other, 1)
        other.commit()
        assert _finished(collector) == 1
        assert len(collector._gaps) == 4
        late.commit()
        assert _finished(collector) == 2
        assert len(collector._gaps) == 3
        monkeypatch.setattr(metrics, "GAP_SECONDS", 0.0)
        assert _finished(collector) == 2
        assert collector._gaps == {}
