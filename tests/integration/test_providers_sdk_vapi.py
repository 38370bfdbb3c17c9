"""The simulator held to Vapi's official Python client (``vapi_server_sdk``).

The SDK drives the simulator (create with an assistant id and a transient assistant, get, list
with every filter, update, delete, a scheduled call), and every raw response and webhook body is
validated against the SDK's models with no undeclared field (``sdk_strict``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.sdk_strict import Recorder, defer_vapi_schemas, strict

vapi = pytest.importorskip("vapi")  # a test dependency: pyproject [test]
defer_vapi_schemas()

from vapi import Vapi  # noqa: E402
from vapi.core.api_error import ApiError  # noqa: E402
from vapi.types import (  # noqa: E402
    AssistantOverrides,
    Call,
    CreateAssistantDto,
    CreateCustomerDto,
    ServerMessage,
    ServerMessageEndOfCallReport,
    ServerMessageStatusUpdate,
)

from providers.base import CallRequest, ProviderConfig, VoicemailAction, VoicemailPolicy  # noqa: E402
from providers.simulator import Simulator  # noqa: E402
from providers.vapi import VapiProvider, build_create_body  # noqa: E402
from tests.conftest import running_simulator  # noqa: E402
from tests.integration.receiver import Receiver  # noqa: E402

KEY = "sim-vapi-key"
# The create response carries subscriptionLimits (Vapi's docs show it); the Call schema lacks it.
CREATE_EXTRAS = frozenset({"$.subscriptionLimits"})
FAST = {"queue_seconds": 0.02, "ring_seconds": 0.03, "call_seconds": 0.1,
        "outcome_mix": {"completed": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def sim(receiver: Receiver) -> Iterator[Simulator]:
    with running_simulator({**FAST, "vapi_webhook_url": receiver.url}) as s:
        yield s


@pytest.fixture
def client(sim: Simulator, rec: Recorder) -> Iterator[Vapi]:
    http = httpx.Client(event_hooks={"response": [rec]}, timeout=10)
    yield Vapi(token=KEY, base_url=sim.vapi_url, httpx_client=http)
    http.close()


_n = iter(range(10**6))


def customer(suffix: str = "0001") -> dict[str, Any]:
    n = next(_n)
    return {"number": f"+1415{n % 1000:03d}{suffix}", "external_id": f"ext-{n}"}


def create(client: Vapi, rec: Recorder, **fields: Any) -> dict[str, Any]:
    fields.setdefault("phone_number_id", "pn-1")
    fields.setdefault("customer", customer())
    if "assistant" not in fields:
        fields.setdefault("assistant_id", "as-1")
    client.calls.create(**fields)
    raw: dict[str, Any] = rec.last
    strict(Call, raw, CREATE_EXTRAS)
    return raw


def wait_ended(client: Vapi, rec: Recorder, call_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        client.calls.get(call_id)
        raw: dict[str, Any] = rec.last
        strict(Call, raw)
        if raw["status"] == "ended" or time.monotonic() > deadline:
            return raw
        time.sleep(0.02)


def test_create_with_assistant_id_then_get_to_the_end(client: Vapi, rec: Recorder) -> None:
    raw = create(client, rec, assistant_overrides={"variable_values": {"slot": "Tue"}})
    assert raw["status"] == "queued" and raw["assistantId"] == "as-1"
    assert raw["assistantOverrides"] == {"variableValues": {"slot": "Tue"}}
    ended = wait_ended(client, rec, raw["id"])
    assert ended["status"] == "ended" and ended["endedReason"] == "customer-ended-call"
    assert {"startedAt", "endedAt", "cost"} <= set(ended)
    assert ended["artifact"]["recordingUrl"]


def test_create_with_a_transient_assistant(client: Vapi, rec: Recorder) -> None:
    assistant = {
        "name": "Reminder", "first_message": "Hi",
        "model": {"provider": "openai", "model": "gpt-4o-mini",
                  "messages": [{"role": "system", "content": "Be brief."}]},
    }  # fmt: skip
    raw = create(client, rec, assistant=assistant)
    assert raw["assistant"]["firstMessage"] == "Hi" and "assistantId" not in raw
    strict(Call, wait_ended(client, rec, raw["id"]))


def test_our_create_bodies_fit_the_sdk_types() -> None:
    """The adapter's body parts parse as the SDK's request models, no field undeclared."""
    req = CallRequest(
        correlation_id="a-1", queue_id="q-1", to_number="+14155550100", recipient_name="Ann",
        recipient_email="ann@example.com", script="Be brief.", first_message="Hi",
        variables={"slot": "Tue"}, template_name="T", max_duration_seconds=120,
        caller_id="pn-2", record=False,
        voicemail=VoicemailPolicy(True, VoicemailAction.LEAVE_MESSAGE, "Call us back"),
    )  # fmt: skip
    for settings in ({"assistant_id": "as-1"}, {}):
        config = ProviderConfig(
            id="p", provider_type="vapi", api_key="k",
            config={"phone_number_id": "pn-1", "webhook_url": "https://h.example/w", **settings},
        )  # fmt: skip
        body = build_create_body(req, config)
        overrides = strict(AssistantOverrides, body["assistantOverrides"])
        assert overrides.max_duration_seconds == 120
        assert overrides.artifact_plan is not None
        assert overrides.artifact_plan.recording_enabled is False
        assert overrides.voicemail_message == "Call us back"
        strict(CreateCustomerDto, body["customer"])
        if "assistant" in body:
            strict(CreateAssistantDto, body["assistant"])


def test_list_filters(client: Vapi, rec: Recorder, sim: Simulator) -> None:
    """Every filter of GET /call, through the SDK's typed arguments."""
    later = {"earliest_at": datetime.now(UTC) + timedelta(hours=1)}  # frozen: only PATCH moves
    made = [
        create(client, rec, assistant_id=f"as-list-{i % 2}", schedule_plan=later) for i in range(4)
    ]
    time.sleep(0.01)
    client.calls.update(made[1]["id"], name="renamed")
    renamed = rec.last
    ids = {c["id"] for c in made}

    def listed(**filters: Any) -> set[str]:
        client.calls.list(**filters)
        calls = rec.last
        for call in calls:
            strict(Call, call)
        return {c["id"] for c in calls} & ids

    created = [datetime.fromisoformat(c["createdAt"].replace("Z", "+00:00")) for c in made]
    first, last = min(created), max(created)
    newest = {c["id"] for c, t in zip(made, created, strict=True) if t == last}
    oldest = {c["id"] for c, t in zip(made, created, strict=True) if t == first}
    assert listed(created_at_ge=first) == ids
    assert listed(created_at_gt=first) == ids - oldest
    assert listed(created_at_le=last, created_at_ge=first) == ids
    assert listed(created_at_lt=last, created_at_ge=first) == ids - newest
    assert listed(created_at_lt=first - timedelta(milliseconds=1), created_at_ge=first) == set()
    changed = datetime.fromisoformat(renamed["updatedAt"].replace("Z", "+00:00"))
    assert renamed["id"] in listed(updated_at_ge=changed)
    assert renamed["id"] not in listed(updated_at_lt=changed, created_at_ge=first)
    assert renamed["id"] in listed(updated_at_le=changed, updated_at_gt=first - timedelta(1))
    assert listed(assistant_id="as-list-1") == {made[1]["id"], made[3]["id"]}
    assert listed(id=made[2]["id"]) == {made[2]["id"]}
    assert listed(phone_number_id="pn-1", created_at_ge=first) == ids
    assert listed(phone_number_id="pn-other", created_at_ge=first) == set()
    client.calls.list(limit=2.0, created_at_ge=first)  # the SDK sends numbers as floats
    assert rec.responses[-1].request.url.params["limit"] == "2.0" and len(rec.last) == 2


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": "many"}, "limit must be a number conforming to the specified constraints"),
        ({"limit": "1001"}, "limit must not be greater than 1000"),
        ({"limit": "-1"}, "limit must not be less than 0"),
        ({"createdAtGt": "yesterday"}, "createdAtGt must be a valid ISO 8601 date string"),
        ({"updatedAtLe": "2026-13-45"}, "updatedAtLe must be a valid ISO 8601 date string"),
        ({"createdAfter": "2026-01-01T00:00:00Z"}, "property createdAfter should not exist"),
    ],
)  # fmt: skip
def test_malformed_list_query_is_a_400_with_vapi_body(
    sim: Simulator, params: dict[str, str], message: str
) -> None:
    """Malformed input answers the real API's NestJS 400 body, never the epoch or a drop."""
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{sim.vapi_url}/call", params=params, headers=headers)
    assert r.status_code == 400
    assert r.json() == {"message": [message], "error": "Bad Request", "statusCode": 400}


def test_sdk_surfaces_the_400(client: Vapi) -> None:
    with pytest.raises(ApiError) as info:
        client.calls.get("not-a-uuid")
    assert info.value.status_code == 400
    assert info.value.body["message"] == "Validation failed (uuid is expected)"


def test_update_is_json(client: Vapi, rec: Recorder) -> None:
    raw = create(client, rec)
    client.calls.update(raw["id"], name="new name")
    updated = strict(Call, rec.last)
    assert updated.name == "new name" and updated.updated_at >= updated.created_at
    r = httpx.patch(
        str(rec.responses[-1].request.url), json={"name": "x" * 41, "status": "ended"},
        headers={"Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert "property status should not exist" in r.json()["message"]


def test_scheduled_call_can_be_deleted_before_it_starts(client: Vapi, rec: Recorder) -> None:
    earliest = datetime.now(UTC) + timedelta(minutes=5)
    raw = create(client, rec, schedule_plan={"earliest_at": earliest})
    assert raw["status"] == "scheduled" and raw["schedulePlan"]["earliestAt"]
    client.calls.get(raw["id"])
    assert strict(Call, rec.last).status == "scheduled"
    client.calls.delete(raw["id"])
    deleted = strict(Call, rec.last)
    assert deleted.status == "ended" and deleted.ended_reason == "scheduled-call-deleted"
    with pytest.raises(ApiError) as info:
        client.calls.get(raw["id"])
    assert info.value.status_code == 404


def test_our_cancel_unschedules_a_scheduled_call(
    client: Vapi, rec: Recorder, sim: Simulator
) -> None:
    """The adapter's cancel-before-start path: a scheduled call is deleted, never dialed."""
    raw = create(
        client, rec, schedule_plan={"earliest_at": datetime.now(UTC) + timedelta(minutes=5)}
    )
    config = ProviderConfig(
        id="v", provider_type="vapi", api_key=KEY, base_url=sim.vapi_url,
        config={"phone_number_id": "pn-1"},
    )  # fmt: skip
    http = httpx.Client(event_hooks={"response": [rec]})
    vapi_provider = VapiProvider(config, http)
    assert vapi_provider.cancel_call(raw["id"]) is True
    assert rec.responses[-1].request.method == "DELETE"
    deleted = strict(Call, rec.last)
    assert deleted.ended_reason == "scheduled-call-deleted" and deleted.started_at is None
    live = create(client, rec)  # a live call is ended through its control URL instead
    assert vapi_provider.cancel_call(live["id"]) is True
    assert rec.responses[-1].request.url.path.endswith("/control")
    http.close()


def test_delete_returns_the_call(client: Vapi, rec: Recorder) -> None:
    raw = create(client, rec)
    client.calls.delete(raw["id"])
    assert strict(Call, rec.last).id == raw["id"]


def test_webhooks_are_server_messages(client: Vapi, rec: Recorder, receiver: Receiver) -> None:
    raw = create(client, rec)
    found = receiver.wait_for(raw["id"].encode(), count=2)
    kinds = {}
    for _, body in found:
        message = strict(ServerMessage, json.loads(body)).message
        kinds[type(message)] = message
    report = kinds[ServerMessageEndOfCallReport]
    assert isinstance(report, ServerMessageEndOfCallReport)
    assert report.started_at and report.ended_at and report.cost is not None
    assert report.call is not None and report.call.id == raw["id"]
    update = kinds[ServerMessageStatusUpdate]
    assert isinstance(update, ServerMessageStatusUpdate) and update.status == "ended"
