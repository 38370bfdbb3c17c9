"""Retell translation: bodies against the SDK's request types, states against its enums,
call parsing, and the webhook signature against the SDK's own signer and verifier."""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from typing import Any

import pytest
from pydantic import TypeAdapter

from providers.base import (
    CallRequest,
    CallState,
    ProviderConfig,
    VoicemailAction,
    VoicemailPolicy,
)
from providers.errors import ConfigError, WebhookAuthError, WebhookPayloadError
from providers.retell import (
    DISCONNECTION_REASONS,
    STATUS_MAP,
    TERMINAL_STATUSES,
    RetellProvider,
    build_create_body,
    list_body,
    parse_call,
    parse_webhook_payload,
    sign,
    state_for,
    verify_webhook,
)
from tests.sdk_strict import typed_dict_extras

KEY = "key_retell_test"
REQ = CallRequest(
    correlation_id="a-1", queue_id="q-1", to_number="+14155550131", recipient_name="Cy",
    script="Prompt", first_message="Hello Cy", variables={"slot": "Tue", "recipient_name": "Cy"},
)  # fmt: skip


def config(**settings: Any) -> ProviderConfig:
    return ProviderConfig(
        id="r", provider_type="retell", api_key=KEY,
        config={"from_number": "+14155550100", "agent_id": "agent_1", **settings},
    )  # fmt: skip


def sdk_literals(annotation: object) -> set[str]:
    values: set[str] = set()
    for arg in typing.get_args(annotation):
        if isinstance(arg, str):
            values.add(arg)
        else:
            values |= sdk_literals(arg)
    return values


# --- request bodies -----------------------------------------------------------------------------


def test_create_body() -> None:
    body = build_create_body(REQ, config(webhook_url="https://h.example/w"))
    assert body == {
        "from_number": "+14155550100", "to_number": "+14155550131",
        "metadata": {"callq_assignment_id": "a-1", "callq_queue_id": "q-1"},
        "retell_llm_dynamic_variables": {"slot": "Tue", "recipient_name": "Cy"},
        "idempotency_key": "a-1", "override_agent_id": "agent_1",
        "agent_override": {"agent": {"webhook_url": "https://h.example/w"},
                           "retell_llm": {"begin_message": "Hello Cy"}},
    }  # fmt: skip
    plain = build_create_body(dataclasses.replace(REQ, first_message=None), config())
    assert "agent_override" not in plain
    flow = build_create_body(REQ, config(response_engine="conversation_flow"))
    assert "agent_override" not in flow  # begin_message is a Retell-LLM override only


@pytest.mark.parametrize(
    ("fields", "agent"),
    [
        ({"max_duration_seconds": 30}, {"max_call_duration_ms": 60_000}),
        ({"max_duration_seconds": 90}, {"max_call_duration_ms": 90_000}),
        ({"max_duration_seconds": 10**5}, {"max_call_duration_ms": 7_200_000}),
        ({"voicemail": VoicemailPolicy(detect=False)}, {"voicemail_option": None}),
        ({"voicemail": VoicemailPolicy()}, {"voicemail_option": {"action": {"type": "hangup"}}}),
        ({"voicemail": VoicemailPolicy(True, VoicemailAction.LEAVE_MESSAGE, "Call back")},
         {"voicemail_option": {"action": {"type": "static_text", "text": "Call back"}}}),
        ({"record": False}, {"data_storage_setting": "basic_attributes_only"}),
        ({"record": True}, None),
    ],
)  # fmt: skip
def test_request_features(fields: dict[str, Any], agent: dict[str, Any] | None) -> None:
    req = dataclasses.replace(REQ, first_message=None, **fields)
    body = build_create_body(req, config())
    assert body.get("agent_override", {}).get("agent") == agent


def test_caller_id_replaces_the_rows_number() -> None:
    body = build_create_body(dataclasses.replace(REQ, caller_id="+14155550199"), config())
    assert body["from_number"] == "+14155550199"
    with pytest.raises(ConfigError, match="from_number"):
        build_create_body(REQ, ProviderConfig(id="r", provider_type="retell", api_key=KEY))


def test_bodies_fit_the_sdk_request_types() -> None:
    """Every body we send validates as the SDK's TypedDict, with no key it does not declare."""
    params = pytest.importorskip("retell.types.call_create_phone_call_params")
    list_params = pytest.importorskip("retell.types.call_list_params")
    req = dataclasses.replace(
        REQ, max_duration_seconds=120, caller_id="+14155550199", record=False,
        voicemail=VoicemailPolicy(True, VoicemailAction.LEAVE_MESSAGE, "Call back"),
    )  # fmt: skip
    body = build_create_body(req, config(webhook_url="https://h.example/w", agent_version=3))
    TypeAdapter(params.CallCreatePhoneCallParams).validate_python(body)
    assert list(typed_dict_extras(params.CallCreatePhoneCallParams, body)) == []
    for page in (list_body(REQ), list_body(REQ, "next")):
        TypeAdapter(list_params.CallListParams).validate_python(page)
        assert list(typed_dict_extras(list_params.CallListParams, page)) == []


# --- states -------------------------------------------------------------------------------------


def test_every_sdk_disconnection_reason_is_classified() -> None:
    """A new SDK value (or a dropped one) fails here: classify it in providers/retell.py."""
    response = pytest.importorskip("retell.types.phone_call_response")
    field = response.PhoneCallResponse.model_fields["disconnection_reason"]
    sdk = sdk_literals(field.annotation)
    assert sorted(sdk - set(DISCONNECTION_REASONS)) == []
    assert sorted(set(DISCONNECTION_REASONS) - sdk) == []


def test_every_sdk_call_status_is_handled() -> None:
    response = pytest.importorskip("retell.types.phone_call_response")
    sdk = sdk_literals(response.PhoneCallResponse.model_fields["call_status"].annotation)
    assert sdk == set(STATUS_MAP) | TERMINAL_STATUSES


@pytest.mark.parametrize(
    ("status", "reason", "in_voicemail", "expected"),
    [
        ("registered", None, False, CallState.QUEUED),
        ("ongoing", None, False, CallState.IN_PROGRESS),
        ("ended", "user_hangup", False, CallState.COMPLETED),
        ("ended", "user_hangup", True, CallState.VOICEMAIL),  # the analysis saw a voicemail box
        ("ended", "voicemail_reached", False, CallState.VOICEMAIL),
        ("not_connected", "dial_busy", False, CallState.BUSY),
        ("not_connected", "dial_no_answer", False, CallState.NO_ANSWER),
        ("not_connected", "invalid_destination", False, CallState.FAILED_PERMANENT),
        ("error", "concurrency_limit_reached", False, CallState.FAILED_RETRYABLE),
        ("ended", "manual_stopped", False, CallState.CANCELED),
        ("ended", None, False, CallState.COMPLETED),
        ("not_connected", None, False, CallState.FAILED_RETRYABLE),
        ("error", "a-new-reason", False, CallState.FAILED_RETRYABLE),
    ],
)
def test_state_for(
    status: str, reason: str | None, in_voicemail: bool, expected: CallState
) -> None:
    assert state_for(status, reason, in_voicemail) is expected


# --- parsing ------------------------------------------------------------------------------------


ENDED = {
    "call_id": "call_1", "call_type": "phone_call", "agent_id": "agent_1", "agent_version": 1,
    "call_status": "ended", "direction": "outbound", "from_number": "+14155550100",
    "to_number": "+14155550131", "metadata": {"callq_assignment_id": "a-1"},
    "start_timestamp": 1_767_225_600_000, "end_timestamp": 1_767_225_642_500,
    "duration_ms": 42_500, "disconnection_reason": "agent_hangup", "transcript": "Agent: hi",
    "recording_url": "https://r.example/1.wav",
    "call_cost": {"combined_cost": 12.5, "product_costs": [], "total_duration_seconds": 42.5,
                  "total_duration_unit_price": 0.3},
}  # fmt: skip


def test_parse_ended_call() -> None:
    status = parse_call(ENDED)
    assert status.state is CallState.COMPLETED and status.answered
    assert status.duration_seconds == 42.5 and status.cost == 0.125  # cents -> USD
    assert status.correlation_id == "a-1" and status.ended_reason == "agent_hangup"
    assert status.started_at is not None and status.started_at.year == 2026
    response = pytest.importorskip("retell.types.phone_call_response")
    response.PhoneCallResponse.model_validate(ENDED)  # the fixture is a valid SDK shape


def test_not_connected_and_errors_after_answer() -> None:
    busy = {**ENDED, "call_status": "not_connected", "disconnection_reason": "dial_busy"}
    for key in ("start_timestamp", "transcript", "duration_ms", "recording_url"):
        busy.pop(key)
    assert parse_call(busy).state is CallState.BUSY and not parse_call(busy).answered
    broken = {
        **ENDED,
        "call_status": "error",
        "disconnection_reason": "error_llm_websocket_runtime",
    }
    assert parse_call(broken).state is CallState.FAILED_RETRYABLE and parse_call(broken).answered


def test_live_call_has_no_end() -> None:
    live = {k: v for k, v in ENDED.items() if k not in ("end_timestamp", "disconnection_reason")}
    status = parse_call({**live, "call_status": "ongoing"})
    assert status.state is CallState.IN_PROGRESS and status.ended_at is None
    assert status.duration_seconds is None and status.ended_reason is None


# --- webhooks -----------------------------------------------------------------------------------


def body_of(event: str = "call_ended") -> bytes:
    return json.dumps({"event": event, "call": ENDED}, separators=(",", ":")).encode()


def test_our_signature_is_what_the_sdk_verifies_and_back() -> None:
    auth = pytest.importorskip("retell.lib.webhook_auth")
    body = body_of()
    ours = sign(body, KEY, int(time.time() * 1000))
    assert auth.verify(body.decode(), KEY, ours)
    theirs = auth.symmetric["sign"](body.decode(), KEY)
    verify_webhook({"X-Retell-Signature": theirs}, body, KEY)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-retell-signature": "nonsense"},
        {"x-retell-signature": sign(body_of(), "other-key", int(time.time() * 1000))},
        {"x-retell-signature": sign(body_of(), KEY, int(time.time() * 1000) - 301_000)},
        {"x-retell-signature": sign(body_of("call_started"), KEY, int(time.time() * 1000))},
    ],
)
def test_webhook_refused(headers: dict[str, str]) -> None:
    with pytest.raises(WebhookAuthError):
        verify_webhook(headers, body_of(), KEY)


def test_webhook_parsed_with_the_api_key_as_the_default_secret() -> None:
    provider = RetellProvider(config())
    body = body_of()
    event = provider.parse_webhook(
        {"x-retell-signature": sign(body, KEY, int(time.time() * 1000))}, body
    )
    assert event.event_type == "call_ended" and event.status.state is CallState.COMPLETED
    provider.close()


@pytest.mark.parametrize(
    "payload",
    [{}, {"event": "call_ended"}, {"event": "call_ended", "call": {"call_status": "ended"}}],
)
def test_webhook_malformed(payload: dict[str, Any]) -> None:
    with pytest.raises(WebhookPayloadError):
        parse_webhook_payload(payload)
