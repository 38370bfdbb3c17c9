"""Flower shows the fleet's workers, queues and tasks, and task arguments hold only ids."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx
import psycopg
import pytest
from celery import Celery

from providers.simulator import Simulator
from tests.e2e.conftest import all_terminal
from worker.embedded import free_port, wait_for_port, wait_until
from worker.fleet import Fleet
from worker.seed import Seeded, schedule_calls

pytestmark = pytest.mark.e2e


def test_flower_lists_workers_and_tasks_without_personal_data(
    conn: psycopg.Connection[Any],
    seeded: Seeded,
    sim: Simulator,
    fleet: Fleet,
    request: pytest.FixtureRequest,
) -> None:
    port = free_port()
    fleet.env = {**fleet.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    fleet.start_worker("flowerwatch")
    fleet.start_beat()
    fleet.start(
        "flower",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
    )
    wait_for_port(port, 60)
    base = f"http://127.0.0.1:{port}"

    def worker_listed() -> bool:
        workers = httpx.get(f"{base}/api/workers?refresh=1", timeout=20).json()
        return any(name.startswith("flowerwatch@") for name in workers)

    wait_until(worker_listed, timeout=60, what="the worker in Flower")
    # Task events are off until Flower switches them on (every 5 s), so keep calls coming.
    # The leading worker claims them in its own process (no task); beat's callq.poll goes out
    # only when a due call waits at its tick, which the listener's claim usually beats: the
    # tick is sent here as beat sends it (to the dispatch queue), so Flower has one to show
    # whatever the race.
    ids: list[Any] = []
    sender = Celery(broker=fleet.env["CALLQ_BROKER_URL"])
    request.addfinalizer(sender.close)

    def tasks_seen() -> dict[str, Any]:
        ids.extend(schedule_calls(conn, seeded, 2, start=len(ids)))
        sender.send_task("callq.poll", queue="dispatch")
        tasks: dict[str, Any] = httpx.get(f"{base}/api/tasks", timeout=10).json()
        names = {t.get("name") for t in tasks.values()}
        # (the leading worker tracks in its own process: no track_due message to see)
        return tasks if {"callq.poll", "callq.health_check"} <= names else {}

    tasks = wait_until(tasks_seen, timeout=90, interval=1.0, what="tasks in Flower")
    wait_until(lambda: all_terminal(conn, ids), timeout=90, what="calls terminal")
    blob = json.dumps(tasks)
    assert "+1555" not in blob and "Customer " not in blob and "sim-vapi-key" not in blob
    # every task's arguments are ids and counters: hex digits, dashes and punctuation only
    allowed = set("0123456789abcdef-'[](), ")
    assert all(set(t.get("args") or "") <= allowed for t in tasks.values()), tasks
    page = httpx.get(f"{base}/workers", timeout=10)
    assert page.status_code == 200 and "flowerwatch@" in page.text
