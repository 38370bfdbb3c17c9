"""SynthFlow translation: bodies, get/list/webhook parsing, status rules, signatures."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers.base import (
    CallRequest,
    CallState,
    ProviderConfig,
    VoicemailAction,
    VoicemailPolicy,
)
from providers.errors import (
    ConfigError,
    ProviderUnprovenMatchError,
    WebhookAuthError,
    WebhookPayloadError,
)
from providers.synthflow import (
    SynthflowProvider,
    build_create_body,
    calls_of,
    correlation_of,
    parse_call,
    parse_create_response,
    pick_match,
    sign,
    state_for,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "providers"
SECRET = "workspace-secret"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def config(**settings: Any) -> ProviderConfig:
    return ProviderConfig(
        id="s", provider_type="synthflow", api_key="k", webhook_secret=SECRET,
        config={"model_id": "model-1", **settings},
    )  # fmt: skip


REQ = CallRequest(
    correlation_id="a-1", queue_id="q-1", to_number="+14155550131", recipient_name="Cy",
    recipient_email="cy@example.com", script="Prompt text", first_message="Hello Cy",
    variables={"slot": "Tue"},
)  # fmt: skip


def test_create_body() -> None:
    body = build_create_body(REQ, config(from_phone_number="+14155550100"))
    assert body == {
        "model_id": "model-1",
        "phone": "+14155550131",
        "name": "Cy",
        "custom_variables": [
            {"key": "slot", "value": "Tue"},
            {"key": "callq_assignment_id", "value": "a-1"},
            {"key": "callq_queue_id", "value": "q-1"},
        ],
        "prompt": "Prompt text",
        "greeting": "Hello Cy",
        "lead_email": "cy@example.com",
        "from_phone_number": "+14155550100",
    }
    assert "prompt" not in build_create_body(REQ, config(send_prompt=False))


def test_create_body_features() -> None:
    """The call's caller id replaces the row's; the agent-level features are not sent (the
    create body has no field for them)."""
    req = dataclasses.replace(
        REQ, caller_id="+14155550199", max_duration_seconds=60, record=False,
        voicemail=VoicemailPolicy(True, VoicemailAction.LEAVE_MESSAGE, "Call back"),
    )  # fmt: skip
    body = build_create_body(req, config(from_phone_number="+14155550100"))
    assert body["from_phone_number"] == "+14155550199"
    plain = build_create_body(REQ, config(from_phone_number="+14155550100"))
    assert {k: v for k, v in body.items() if k != "from_phone_number"} == {
        k: v for k, v in plain.items() if k != "from_phone_number"
    }


def test_create_body_needs_model_id() -> None:
    bad = ProviderConfig(id="s", provider_type="synthflow", api_key="k")
    with pytest.raises(ConfigError, match="model_id"):
        build_create_body(REQ, bad)


def test_create_response() -> None:
    assert (
        parse_create_response(fixture("synthflow_create.json"))
        == "c5b3a2f1-9e8d-4c7b-a6f5-e4d3c2b1a0f9"
    )
    assert parse_create_response({"status": "error"}) is None


def test_get_completed() -> None:
    status = parse_call(calls_of(fixture("synthflow_get_completed.json"))[0])
    assert status.state is CallState.COMPLETED and status.answered
    assert status.duration_seconds == 74 and status.cost is None
    assert status.started_at == datetime.fromtimestamp(1795000000, UTC)
    assert (
        status.ended_at is not None and (status.ended_at - status.started_at).total_seconds() == 74
    )
    assert status.correlation_id == "7f6c2b1e-0000-4000-8000-000000000006"
    assert status.recording_url and status.transcript


def test_get_failed_invalid_number_is_permanent() -> None:
    status = parse_call(calls_of(fixture("synthflow_get_failed.json"))[0])
    assert status.state is CallState.FAILED_PERMANENT and not status.answered
    assert status.ended_reason == "Telephony - 400 - Invalid phone number"


def test_list_items_use_call_status() -> None:
    items = calls_of(fixture("synthflow_list.json"))
    assert [parse_call(i).state for i in items] == [CallState.BUSY, CallState.VOICEMAIL]


def test_a_call_without_proof_is_never_adopted() -> None:
    items = calls_of(fixture("synthflow_list.json"))  # same number, no correlation echoed
    since = datetime.fromtimestamp(1795000000, UTC)
    # the old main took the earliest of these as ours: it may be another tenant's call
    with pytest.raises(ProviderUnprovenMatchError):
        pick_match(items, REQ, since)
    assert pick_match(items, REQ, datetime.fromtimestamp(1795000020, UTC)) is None


def test_another_tenants_echoed_call_is_not_ours() -> None:
    theirs = {"call_id": "theirs", "prompt_variables": {"callq_assignment_id": "b-9"},
              "lead_phone_number": REQ.to_number, "start_time": "1795000010000"}  # fmt: skip
    assert pick_match([theirs], REQ, datetime.fromtimestamp(0, UTC)) is None


@given(
    items=st.lists(
        st.fixed_dictionaries(
            {"call_id": st.text(min_size=1, max_size=5)},
            optional={
                "prompt_variables": st.fixed_dictionaries(
                    {"callq_assignment_id": st.sampled_from(["a-1", "a-2", "b-1", ""])}
                ),
                "lead_phone_number": st.sampled_from([REQ.to_number, "+14155550199"]),
                "start_time": st.sampled_from(["1795000010000", "1", "bad"]),
                "external_id": st.sampled_from(["a-1", "z"]),
            },
        ),
        max_size=6,
    )
)
def test_only_proof_ever_matches(items: list[dict[str, Any]]) -> None:
    try:
        found = pick_match(items, REQ, datetime.fromtimestamp(1795000000, UTC))
    except ProviderUnprovenMatchError:
        return
    assert found is None or correlation_of(found) == REQ.correlation_id


def test_pick_match_prefers_echoed_id() -> None:
    items = [
        {"call_id": "other", "prompt_variables": {"callq_assignment_id": "a-0"},
         "lead_phone_number": REQ.to_number, "start_time": "1795000010000"},
        {"call_id": "mine", "prompt_variables": {"callq_assignment_id": "a-1"},
         "lead_phone_number": REQ.to_number, "start_time": "1795000020000"},
    ]  # fmt: skip
    found = pick_match(items, REQ, datetime.fromtimestamp(0, UTC))
    assert found is not None and found["call_id"] == "mine"


@pytest.mark.parametrize(
    ("status", "reason", "error", "expected"),
    [
        ("pending", None, "", CallState.QUEUED),
        ("registered", None, "", CallState.QUEUED),
        ("paused", None, "", CallState.QUEUED),
        ("ringing", None, "", CallState.RINGING),
        ("in-progress", None, "", CallState.IN_PROGRESS),
        ("completed", "human_ended_call", "", CallState.COMPLETED),
        ("completed", "human_goodbye", "", CallState.COMPLETED),
        ("completed", "agent_goodbye", "", CallState.COMPLETED),
        ("completed", "max_duration", "", CallState.COMPLETED),
        ("completed", "human_pick_up_cut_off", "", CallState.COMPLETED),
        ("completed", "voicemail", "", CallState.VOICEMAIL),
        ("completed", "voicemail_cut_off", "", CallState.VOICEMAIL),
        ("completed", "voicemail_message_left", "", CallState.VOICEMAIL),
        ("completed", "error", "", CallState.FAILED_RETRYABLE),
        ("hangup_on_voicemail", None, "", CallState.VOICEMAIL),
        ("left_voicemail", "voicemail_message_left", "", CallState.VOICEMAIL),
        ("no-answer", None, "", CallState.NO_ANSWER),
        ("busy", None, "", CallState.BUSY),
        ("canceled", None, "", CallState.CANCELED),
        ("user-canceled", "user_canceled", "", CallState.CANCELED),
        ("spam", None, "", CallState.FAILED_PERMANENT),
        ("failed", None, "Telephony - 400 - Invalid phone number", CallState.FAILED_PERMANENT),
        ("failed", None, "404: Not Found", CallState.FAILED_PERMANENT),
        ("failed", None, "608: Rejected", CallState.FAILED_PERMANENT),
        ("failed", None, "Insufficient Minutes", CallState.FAILED_PERMANENT),
        ("failed", None, "403 Caller ID is unauthorized", CallState.FAILED_PERMANENT),
        (
            "failed",
            None,
            "429: Rate limit exceeded. Your rate limit per minute is 60",
            CallState.FAILED_RETRYABLE,
        ),
        ("failed", None, "487: Request Terminated", CallState.FAILED_RETRYABLE),
        ("failed", None, "", CallState.FAILED_RETRYABLE),
    ],
)
def test_state_rules(status: str, reason: str | None, error: str, expected: CallState) -> None:
    assert state_for(status, reason, error) is expected


def webhook_body() -> bytes:
    return (FIXTURES / "synthflow_webhook.json").read_bytes()


@pytest.mark.parametrize(
    "header", ["Synthflow-Signature", "synthflow-signature", "HTTP_SYNTHFLOW_SIGNATURE"]
)
def test_webhook_signature_accepted(header: str) -> None:
    signature = sign("c5b3a2f1-9e8d-4c7b-a6f5-e4d3c2b1a0f9", SECRET)
    event = SynthflowProvider(config()).parse_webhook({header: signature}, webhook_body())
    assert event.status.state is CallState.COMPLETED
    assert event.status.correlation_id == "7f6c2b1e-0000-4000-8000-000000000006"
    assert event.status.started_at == datetime(2026, 11, 18, 21, 46, 34, tzinfo=UTC)


def test_old_example_with_reason_in_error_message() -> None:
    payload = json.loads(webhook_body())
    payload["call"]["end_call_reason"] = "completed"
    payload["error_message"] = "agent_goodbye"
    signature = sign(payload["call"]["call_id"], SECRET)
    event = SynthflowProvider(config()).parse_webhook(
        {"Synthflow-Signature": signature}, json.dumps(payload).encode()
    )
    assert event.status.state is CallState.COMPLETED


@pytest.mark.parametrize(
    "headers", [{}, {"Synthflow-Signature": "bad"}, {"Synthflow-Signature": sign("other", SECRET)}]
)
def test_webhook_bad_signature(headers: dict[str, str]) -> None:
    with pytest.raises(WebhookAuthError):
        SynthflowProvider(config()).parse_webhook(headers, webhook_body())


@pytest.mark.parametrize("body", [b"nope", b"{}", b'{"call": {}}'])
def test_webhook_malformed(body: bytes) -> None:
    with pytest.raises(WebhookPayloadError):
        SynthflowProvider(config()).parse_webhook({"Synthflow-Signature": "x"}, body)


def test_cancel_is_unsupported() -> None:
    assert SynthflowProvider(config()).cancel_call("anything") is False
