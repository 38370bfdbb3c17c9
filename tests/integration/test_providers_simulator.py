"""The simulator speaks both APIs, validates like them, is seeded, and is fast enough to bench."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from providers.simulator import Simulator
from tests.conftest import running_simulator
from tests.integration.receiver import Receiver
from worker.embedded import wait_until

VAPI_AUTH = {"Authorization": "Bearer sim-vapi-key"}
SF_AUTH = {"Authorization": "Bearer sim-synthflow-key"}


def vapi_body(n: int, suffix: str = "0001", **extra: Any) -> dict[str, Any]:
    return {
        "phoneNumberId": "pn",
        "assistantId": "as",
        "customer": {"number": f"+1415{n % 1000000:06d}"[:-4] + suffix, "externalId": f"c{n}"},
        "assistantOverrides": {
            "metadata": {"callq_assignment_id": f"c{n}", "callq_queue_id": "q1"}
        },
        **extra,
    }


@pytest.fixture
def sim() -> Iterator[Simulator]:
    config = {
        "queue_seconds": 0.01,
        "ring_seconds": 0.02,
        "call_seconds": 0.05,
        "outcome_mix": {"completed": 1},
    }
    with running_simulator(config) as s:
        yield s


@pytest.fixture
def client(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, timeout=10) as c:
        yield c


def test_vapi_rejects_unknown_fields_like_vapi(client: httpx.Client) -> None:
    body = vapi_body(1, type="outboundPhoneCall")
    body["customer"]["phone"] = "x"
    r = client.post("/vapi/call", json=body, headers=VAPI_AUTH)
    assert r.status_code == 400
    assert r.json() == {
        "message": ["property type should not exist", "customer.property phone should not exist"],
        "error": "Bad Request",
        "statusCode": 400,
    }


def test_vapi_rejects_non_e164(client: httpx.Client) -> None:
    body = vapi_body(1)
    body["customer"]["number"] = "4155550100"
    r = client.post("/vapi/call", json=body, headers=VAPI_AUTH)
    assert r.status_code == 400 and "E.164" in r.json()["message"][0]


def test_synthflow_requires_fields(client: httpx.Client) -> None:
    r = client.post("/synthflow/v2/calls", json={"phone": "+14155550100"}, headers=SF_AUTH)
    assert r.status_code == 422
    missing = {tuple(d["loc"]) for d in r.json()["detail"]}
    assert missing == {("body", "model_id"), ("body", "name")}
    r = client.get("/synthflow/v2/calls", headers=SF_AUTH)
    assert r.status_code == 400


@pytest.mark.parametrize("path", ["/vapi/call", "/synthflow/v2/calls"])
@pytest.mark.parametrize(
    "auth", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "sim-vapi-key"}]
)
def test_auth_required(client: httpx.Client, path: str, auth: dict[str, str]) -> None:
    assert client.get(path, headers=auth).status_code == 401


def test_keys_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_API_KEYS", "k1, k2")
    s = Simulator().start()
    try:
        with httpx.Client(base_url=s.base_url) as c:
            assert c.get("/vapi/call", headers={"Authorization": "Bearer k2"}).status_code == 200
            assert c.get("/vapi/call", headers=VAPI_AUTH).status_code == 401
    finally:
        s.stop()


def test_progression_and_shapes(client: httpx.Client) -> None:
    created = client.post("/vapi/call", json=vapi_body(1), headers=VAPI_AUTH)
    assert created.status_code == 201
    call = created.json()
    assert call["status"] == "queued" and {"id", "orgId", "createdAt", "updatedAt"} <= set(call)
    seen = set()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        current = client.get(f"/vapi/call/{call['id']}", headers=VAPI_AUTH).json()
        seen.add(current["status"])
        if current["status"] == "ended":
            break
    assert current["endedReason"] == "customer-ended-call"
    assert current["artifact"]["transcript"] and current["startedAt"] <= current["endedAt"]
    assert "ended" in seen
    listed = client.get("/vapi/call", params={"limit": 5}, headers=VAPI_AUTH).json()
    assert isinstance(listed, list) and listed[0]["id"] == call["id"]


def test_synthflow_shapes(client: httpx.Client) -> None:
    body = {"model_id": "m", "phone": "+14155550100", "name": "Ann",
            "custom_variables": [{"key": "callq_assignment_id", "value": "s1"}]}  # fmt: skip
    created = client.post("/synthflow/v2/calls", json=body, headers=SF_AUTH).json()
    assert created["status"] == "success" and created["response"]["call_id"]
    one = client.get(
        f"/synthflow/v2/calls/{created['response']['call_id']}", headers=SF_AUTH
    ).json()
    assert one["response"]["pagination"]["total_records"] == 1
    assert one["response"]["calls"][0]["status"] in {
        "pending",
        "ringing",
        "in-progress",
        "completed",
    }
    listed = client.get("/synthflow/v2/calls", params={"model_id": "m"}, headers=SF_AUTH).json()
    item = listed["response"]["calls"][0]
    assert "call_status" in item and "status" not in item and item["start_time"].isdigit()


def test_outcomes_are_seeded_and_forced_by_suffix() -> None:
    mix = {"completed": 1, "busy": 1, "no_answer": 1, "voicemail": 1, "failed": 1}

    def outcomes(seed: int) -> list[str]:
        s = Simulator({"seed": seed, "outcome_mix": mix, "outcomes_by_suffix": {"0002": "busy"}})
        return [s.engine.outcome_for(f"corr-{i}", "+14155550001") for i in range(200)]

    assert outcomes(1) == outcomes(1)
    assert outcomes(1) != outcomes(2)
    assert set(outcomes(1)) == set(mix)
    s = Simulator({"outcomes_by_suffix": {"0002": "busy"}})
    assert s.engine.outcome_for("anything", "+14155550002") == "busy"


def test_answer_at_once(client: httpx.Client, sim: Simulator) -> None:
    sim.configure({"answer_at_once": True})
    call = client.post("/vapi/call", json=vapi_body(7), headers=VAPI_AUTH).json()
    now = client.get(f"/vapi/call/{call['id']}", headers=VAPI_AUTH).json()
    assert now["status"] == "ended"
    assert sim.stats()["active"] == 0


def test_control_api(client: httpx.Client, sim: Simulator) -> None:
    sim.configure({"call_seconds": 30})  # both calls still live when the stats are read
    client.post("/vapi/call", json=vapi_body(1), headers=VAPI_AUTH)
    client.post("/vapi/call", json=vapi_body(1), headers=VAPI_AUTH)
    stats = client.get("/_sim/stats", params={"times": 1}).json()
    assert stats["creates"] == {"c1": 2} and stats["creates_by_queue"] == {"q1": 2}
    assert stats["total_creates"] == 2 and stats["active"] == 2
    assert {"monotonic", "wall"} <= set(stats["create_times"]["c1"][0])
    assert "create_times" not in client.get("/_sim/stats").json()
    merged = client.post("/_sim/config", json={"latency_ms": 1, "outcome_mix": {"busy": 1}}).json()
    assert merged["latency_ms"] == 1 and merged["outcome_mix"] == {"busy": 1}
    assert client.post("/_sim/reset").json() == {"ok": True}
    assert client.get("/_sim/stats").json()["total_creates"] == 0


def test_faults(client: httpx.Client, sim: Simulator) -> None:
    sim.configure({"error_rate": 1.0})
    assert client.get("/vapi/call", headers=VAPI_AUTH).status_code == 500
    sim.configure(
        {
            "error_rate": 0.0,
            "outages": [{"start": 0, "end": 60, "mode": "refuse", "provider": "synthflow"}],
        }
    )
    assert client.get("/vapi/call", headers=VAPI_AUTH).status_code == 200
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/synthflow/v2/calls", params={"model_id": "m"}, headers=SF_AUTH)
    sim.configure({"outages": [{"start": 10, "end": 20, "mode": "500"}]})
    assert client.get("/vapi/call", headers=VAPI_AUTH).status_code == 200
    sim.configure({"outages": [], "max_concurrent": {"vapi": 1}, "retry_after_seconds": 3})
    sim.configure({"outcomes_by_suffix": {"0009": "stuck"}})
    assert (
        client.post("/vapi/call", json=vapi_body(1, "0009"), headers=VAPI_AUTH).status_code == 201
    )
    r = client.post("/vapi/call", json=vapi_body(2, "0009"), headers=VAPI_AUTH)
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"


def test_cli_serves(tmp_path: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"latency_ms": 0}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "providers.simulator", "--port", str(port), "--seed", "3",
         "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/_sim/config", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.05)
        assert r.json()["seed"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_concurrent_creates_on_keep_alive_connections(sim: Simulator) -> None:
    """Creates from several keep-alive clients at once all succeed and are all counted (the
    rate itself is a benchmark figure, never asserted here)."""
    sim.configure({"answer_at_once": True})
    threads, per_thread = 8, 50
    errors: list[int] = []

    def worker(t: int) -> None:
        with httpx.Client(base_url=sim.base_url, timeout=10) as c:
            for i in range(per_thread):
                r = c.post("/vapi/call", json=vapi_body(t * 10000 + i), headers=VAPI_AUTH)
                if r.status_code != 201:
                    errors.append(r.status_code)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors
    assert sim.stats()["total_creates"] == threads * per_thread


class _SlowEndpoint:
    """Holds every delivery of the first call it hears of until ``release`` is set."""

    def __init__(self) -> None:
        self.slow_call = ""
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, body: bytes) -> None:
        call_id = json.loads(body)["message"]["call"]["id"]
        with self._lock:
            self.slow_call = self.slow_call or call_id
        if call_id == self.slow_call:
            self.release.wait(10)


def _messages(receiver: Receiver) -> list[tuple[str, str]]:
    """(call id, message type) of each delivery so far, in arrival order."""
    out = []
    for _, body in list(receiver.deliveries):
        message = json.loads(body)["message"]
        out.append((message["call"]["id"], message["type"]))
    return out


def _reports(receiver: Receiver) -> set[str]:
    return {c for c, kind in _messages(receiver) if kind == "end-of-call-report"}


def test_webhooks_go_out_concurrently_across_calls_and_in_order_within_one() -> None:
    """A provider posts different calls' webhooks from many senders: one slow delivery holds
    up only the calls that share its sender, and each call's status-update comes before its
    end-of-call-report."""
    slow = _SlowEndpoint()
    receiver = Receiver(hold=slow)
    config = {"queue_seconds": 0.01, "ring_seconds": 0.01, "call_seconds": 0.3,
              "outcome_mix": {"completed": 1}, "vapi_webhook_auth": "header",
              "webhook_url": receiver.url, "webhook_senders": 8}  # fmt: skip
    try:
        with running_simulator(config) as s, httpx.Client(base_url=s.base_url, timeout=10) as c:
            ids = [
                c.post("/vapi/call", json=vapi_body(n), headers=VAPI_AUTH).json()["id"]
                for n in range(25)
            ]
            wait_until(lambda: slow.slow_call, timeout=10, what="a first delivery")
            others = set(ids) - {slow.slow_call}  # one sender thread blocks on that call
            wait_until(lambda: len(_reports(receiver) & others) >= 12, timeout=10,
                       what="other calls' reports while one delivery hangs")  # fmt: skip
            assert slow.slow_call not in _reports(receiver)
            slow.release.set()
            wait_until(lambda: _reports(receiver) >= set(ids), timeout=10, what="every report")
        for call_id in ids:
            kinds = [kind for c_id, kind in _messages(receiver) if c_id == call_id]
            assert kinds == ["status-update", "end-of-call-report"], (call_id, kinds)
    finally:
        slow.release.set()
        receiver.close()
