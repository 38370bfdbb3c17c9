"""A real Prometheus server scrapes ``callq metrics`` during an end-to-end run, and PromQL over
its HTTP API returns what the database says happened.

The test starts Debian's ``prometheus`` on its own port with its own config and data directory
(scraping every second) and stops it after.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from providers.simulator import Simulator
from tests.e2e.conftest import all_terminal
from worker.embedded import free_port, wait_until
from worker.fleet import Fleet
from worker.seed import Seeded, schedule_calls

pytestmark = pytest.mark.e2e
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    def __init__(self, root: Path, target: str) -> None:
        self.port = free_port()
        (root / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: callq\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.load(resp)
        except OSError:
            return []
        return list(body["data"]["result"]) if body.get("status") == "success" else []

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def metrics_fleet(fleet: Fleet) -> Iterator[tuple[Fleet, str]]:
    port = free_port()
    fleet.start(
        "metrics",
        [sys.executable, "-m", "worker.cli", "metrics", "--host", "127.0.0.1", "--port", str(port)],
    )
    yield fleet, f"127.0.0.1:{port}"


@pytest.fixture
def prometheus(metrics_fleet: tuple[Fleet, str], tmp_path: Path) -> Iterator[Prometheus]:
    root = tmp_path / "prometheus"
    root.mkdir()
    server = Prometheus(root, metrics_fleet[1])
    yield server
    server.stop()


def test_prometheus_scrapes_the_fleet(
    conn: psycopg.Connection[Any],
    seeded: Seeded,
    sim: Simulator,
    metrics_fleet: tuple[Fleet, str],
    prometheus: Prometheus,
) -> None:
    fleet, _ = metrics_fleet
    wait_until(lambda: prometheus.value('up{job="callq"}') == 1, timeout=60, what="a first scrape")
    sim.configure({"outcomes_by_suffix": {"9001": "busy"}})
    answered = schedule_calls(conn, seeded, 12)
    busy = schedule_calls(conn, seeded, 2, suffix="9001", start=100)
    ids = answered + busy
    fleet.start_worker()
    fleet.start_beat()
    wait_until(lambda: all_terminal(conn, ids), timeout=120, what="every call terminal")

    # 12 answered attempts, 2 calls x 3 busy attempts; 12 completed, 2 failed
    def settled() -> bool:
        return (
            prometheus.value('sum(callq_calls_finished_total{status="completed"})') == 12
            and prometheus.value('sum(callq_calls_finished_total{status="failed"})') == 2
        )

    wait_until(settled, timeout=60, what="the finished counters in Prometheus")
    assert prometheus.value('sum(callq_calls_ended_total{outcome="completed"})') == 12
    assert prometheus.value('sum(callq_calls_ended_total{outcome="busy"})') == 6
    assert prometheus.value("sum(callq_schedule_to_create_seconds_count)") == 18
    assert prometheus.value("sum(callq_provider_slots_in_use)") == 0
    assert prometheus.value("callq_queue_due_calls") == 0
    assert prometheus.value("sum(callq_provider_circuit_open)") == 0
    # the gauge is the latest answer of a ping sent every 5 s: a worker busy with the burst may
    # have missed one, so wait for an answer rather than reading one sample
    wait_until(
        lambda: (prometheus.value("callq_workers_responding") or 0) >= 1,
        timeout=30,
        what="a worker answering the metrics process's ping",
    )
    p99 = prometheus.value(
        "histogram_quantile(0.99, sum by (le) (callq_schedule_to_create_seconds_bucket))"
    )
    assert p99 is not None and 0 < p99 < 60
    providers = {r["metric"]["provider"] for r in prometheus.query("callq_provider_up")}
    assert len(providers) == 2
