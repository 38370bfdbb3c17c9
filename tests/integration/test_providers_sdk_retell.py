"""The simulator held to Retell's official Python client (``retell-sdk``).

The SDK drives the simulator's Retell API (create, get, list with filters and pages, update,
stop, delete, concurrency); every raw response and webhook is validated against the SDK's
models with no undeclared field, and the webhook signature with the SDK's own ``verify``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

retell = pytest.importorskip("retell")  # a test dependency: pyproject [test]

from retell import Retell  # noqa: E402
from retell.lib.webhook_auth import verify  # noqa: E402
from retell.types import CallListResponse, ConcurrencyRetrieveResponse  # noqa: E402
from retell.types.phone_call_response import PhoneCallResponse  # noqa: E402

from providers.simulator import Simulator  # noqa: E402
from tests.conftest import running_simulator  # noqa: E402
from tests.integration.receiver import Receiver  # noqa: E402
from tests.sdk_strict import Recorder, strict  # noqa: E402

KEY = "sim-retell-key"
FROM = "+14155550100"
FAST = {
    "queue_seconds": 0.02, "ring_seconds": 0.03, "call_seconds": 0.1,
    "outcome_mix": {"completed": 1}, "outcomes_by_suffix": {"0002": "busy", "0009": "stuck"},
}  # fmt: skip


@pytest.fixture(scope="module")
def sim(receiver: Receiver) -> Iterator[Simulator]:
    with running_simulator({**FAST, "retell_webhook_url": receiver.url}) as s:
        yield s


@pytest.fixture
def client(sim: Simulator, rec: Recorder) -> Iterator[Retell]:
    http = httpx.Client(event_hooks={"response": [rec]}, timeout=10)
    yield Retell(api_key=KEY, base_url=sim.retell_url, http_client=http, max_retries=0)
    http.close()


_n = iter(range(10**6))


def create(client: Retell, rec: Recorder, suffix: str = "0001", **fields: Any) -> dict[str, Any]:
    n = next(_n)
    fields.setdefault("metadata", {"callq_assignment_id": f"a-{n}"})
    client.call.create_phone_call(
        from_number=FROM, to_number=f"+1415{n % 1000:03d}{suffix}", **fields
    )
    assert rec.responses[-1].status_code == 201
    raw: dict[str, Any] = rec.last
    strict(PhoneCallResponse, raw)
    return raw


def wait_ended(client: Retell, rec: Recorder, call_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        client.call.retrieve(call_id)
        raw: dict[str, Any] = rec.last
        strict(PhoneCallResponse, raw)
        if raw["call_status"] in ("ended", "not_connected", "error") or time.monotonic() > deadline:
            return raw
        time.sleep(0.02)


def test_create_with_overrides_then_get_to_the_end(client: Retell, rec: Recorder) -> None:
    raw = create(
        client, rec, override_agent_id="agent_9",
        retell_llm_dynamic_variables={"slot": "Tue"}, idempotency_key="idem-1",
        agent_override={
            "agent": {"max_call_duration_ms": 120_000,
                      "voicemail_option": {"action": {"type": "static_text", "text": "Hi"}}},
            "retell_llm": {"begin_message": "Hello"},
        },
    )  # fmt: skip
    assert raw["call_status"] == "registered" and raw["agent_id"] == "agent_9"
    assert raw["retell_llm_dynamic_variables"] == {"slot": "Tue"}
    ended = wait_ended(client, rec, raw["call_id"])
    assert ended["call_status"] == "ended" and ended["disconnection_reason"] == "user_hangup"
    assert ended["duration_ms"] > 0 and ended["transcript"] and ended["call_cost"]
    assert ended["start_timestamp"] < ended["end_timestamp"]


def test_idempotency_key_returns_the_first_call(
    client: Retell, rec: Recorder, sim: Simulator
) -> None:
    first = create(client, rec, idempotency_key="idem-repeat")
    again = create(client, rec, idempotency_key="idem-repeat")
    assert again["call_id"] == first["call_id"]


def test_not_connected_call(client: Retell, rec: Recorder) -> None:
    raw = create(client, rec, "0002")
    ended = wait_ended(client, rec, raw["call_id"])
    assert (ended["call_status"], ended["disconnection_reason"]) == ("not_connected", "dial_busy")
    assert "start_timestamp" not in ended


def test_list_with_filters_and_pages(client: Retell, rec: Recorder) -> None:
    made = [create(client, rec, metadata={"callq_assignment_id": f"list-{i}", "batch": "L"})
            for i in range(5)]  # fmt: skip
    by_meta = [{"key": "batch", "type": "string", "op": "eq", "value": "L"}]

    def listed(**params: Any) -> tuple[list[str], dict[str, Any]]:
        client.call.list(**params)
        page = strict(CallListResponse, rec.last)
        for item in rec.last["items"]:
            strict(PhoneCallResponse, {**item})  # list items are phone calls without transcript
        return [i.call_id for i in page.items], rec.last

    ids, _ = listed(filter_criteria={"metadata": by_meta}, limit=10)
    assert set(ids) == {c["call_id"] for c in made}
    one = [{"key": "callq_assignment_id", "type": "string", "op": "eq", "value": "list-3"}]
    assert listed(filter_criteria={"metadata": one})[0] == [made[3]["call_id"]]
    target = {"op": "eq", "type": "string", "value": made[1]["to_number"]}
    assert made[1]["call_id"] in listed(filter_criteria={"to_number": target})[0]
    call_id = {"op": "in", "type": "enum", "value": [made[0]["call_id"], made[4]["call_id"]]}
    assert set(listed(filter_criteria={"call_id": call_id})[0]) == {
        made[0]["call_id"],
        made[4]["call_id"],
    }
    pages: list[str] = []
    key: str | None = None
    while True:
        params: dict[str, Any] = {"filter_criteria": {"metadata": by_meta}, "limit": 2}
        if key:
            params["pagination_key"] = key
        ids, raw = listed(**params)
        pages += ids
        key = raw.get("pagination_key")
        if not raw["has_more"]:
            break
    assert sorted(pages) == sorted(c["call_id"] for c in made) and len(pages) == 5


def test_update_stop_delete(client: Retell, rec: Recorder) -> None:
    raw = create(client, rec, "0009")  # never ends by itself
    client.call.update(raw["call_id"], metadata={"callq_assignment_id": "moved"})
    assert strict(PhoneCallResponse, rec.last).metadata == {"callq_assignment_id": "moved"}
    client.call.stop(raw["call_id"])
    assert rec.responses[-1].status_code == 204
    ended = wait_ended(client, rec, raw["call_id"])
    assert ended["disconnection_reason"] == "manual_stopped"
    client.call.delete(raw["call_id"])
    assert rec.responses[-1].status_code == 204
    with pytest.raises(retell.NotFoundError):
        client.call.retrieve(raw["call_id"])


def test_errors_are_retell_shaped(client: Retell, sim: Simulator) -> None:
    with pytest.raises(retell.BadRequestError) as info:
        client.call.create_phone_call(from_number=FROM, to_number="555-0100")
    assert info.value.body == {
        "status": "error",
        "message": "to_number is not a valid E.164 number",
    }
    with pytest.raises(retell.BadRequestError):
        client.call.create_phone_call(
            from_number=FROM, to_number="+14155550100",
            agent_override={"agent": {"max_call_duration_ms": 1000}},
        )  # fmt: skip
    bad = Retell(api_key="wrong", base_url=sim.retell_url, max_retries=0)
    with pytest.raises(retell.AuthenticationError):
        bad.call.retrieve("anything")


def test_concurrency(client: Retell, rec: Recorder) -> None:
    client.concurrency.retrieve()
    strict(ConcurrencyRetrieveResponse, rec.last)


def test_webhooks_signed_and_shaped(client: Retell, rec: Recorder, receiver: Receiver) -> None:
    raw = create(client, rec)
    found = receiver.wait_for(raw["call_id"].encode(), count=3)
    events = {}
    for headers, body in found:
        signature = {k.lower(): v for k, v in headers.items()}["x-retell-signature"]
        assert verify(body.decode(), KEY, signature)
        payload = json.loads(body)
        assert set(payload) == {"event", "call"}
        events[payload["event"]] = strict(PhoneCallResponse, payload["call"])
    assert set(events) == {"call_started", "call_ended", "call_analyzed"}
    assert events["call_started"].call_status == "ongoing"
    assert events["call_ended"].call_analysis is None  # the analysis comes with call_analyzed
    assert events["call_analyzed"].call_analysis is not None
