"""Vapi translation: request bodies against the OpenAPI spec, Call parsing, reasons, webhooks."""

from __future__ import annotations

import copy
import csv
import gzip
import hashlib
import hmac
import json
import time
import typing
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from providers.base import (
    CallRequest,
    CallState,
    ProviderConfig,
    VoicemailAction,
    VoicemailPolicy,
)
from providers.errors import ConfigError, WebhookAuthError, WebhookPayloadError
from providers.vapi import (
    VapiProvider,
    build_create_body,
    ended_reason_map,
    parse_call,
    parse_webhook_payload,
    state_for,
    verify_webhook,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "providers"
SHARED = Path(__file__).parents[3] / "shared" / "providers"
SPEC_PATH = SHARED / "specs" / "vapi-openapi.json"
CSV_PATH = Path(__file__).parents[2] / "providers" / "data" / "vapi-ended-reason-map.csv"
SECRET = "whsec-test"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def request(**overrides: Any) -> CallRequest:
    fields: dict[str, Any] = {
        "correlation_id": "7f6c2b1e-0000-4000-8000-000000000001",
        "queue_id": "3e2d1c0b-0000-4000-8000-000000000009",
        "to_number": "+14155550123",
        "recipient_name": "Ann",
        "recipient_email": "ann@example.com",
        "script": "You are calling {{ recipient_name }} about an appointment.",
        "first_message": "Hi {{ recipient_name }}!",
        "variables": {"recipient_name": "Ann", "slot": "Tuesday 10:00"},
        "template_name": "Appointment reminder",
    }
    fields.update(overrides)
    return CallRequest(**fields)


def config(webhook_secret: str | None = None, **settings: Any) -> ProviderConfig:
    return ProviderConfig(
        id="p",
        provider_type="vapi",
        api_key="k",
        webhook_secret=webhook_secret,
        config={"phone_number_id": "pn-1", **settings},
    )


# --- the spec -----------------------------------------------------------------------------------


SUBSET_PATH = FIXTURES / "vapi-openapi.subset.json.gz"


@cache
def spec() -> dict[str, Any]:
    """The Vapi spec: the shared byte-exact copy when present, else the vendored subset
    (schemas reachable from CreateCallDTO and Call) so a clean clone can run this."""
    source = (
        SPEC_PATH.read_bytes() if SPEC_PATH.exists() else gzip.decompress(SUBSET_PATH.read_bytes())
    )
    data: dict[str, Any] = json.loads(source)
    return data


def test_vendored_subset_matches_shared_spec() -> None:
    if not SPEC_PATH.exists():
        pytest.skip("shared spec not present; the subset is the reference")
    subset = json.loads(gzip.decompress(SUBSET_PATH.read_bytes()))["components"]["schemas"]
    full = spec()["components"]["schemas"]
    assert {"CreateCallDTO", "Call", "CreateCustomerDTO", "AssistantOverrides"} <= set(subset)
    assert all(subset[name] == full[name] for name in subset)


@cache
def strict_components() -> dict[str, Any]:
    """The spec's components with unknown properties forbidden, as Vapi's validator does."""
    components: dict[str, Any] = copy.deepcopy(spec()["components"])

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            node.pop("example", None)
            if node.get("type") == "array" and "enum" in node:
                del node["enum"]  # the spec puts the item enum on some arrays themselves
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)

    walk(components)
    return components


def validate(body: dict[str, Any], schema_name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": strict_components()}
    jsonschema.Draft7Validator(schema).validate(body)


BODY_VARIANTS = {
    "assistant-id": ({"assistant_id": "as-1"}, {}),
    "assistant-id-no-first-message": ({"assistant_id": "as-1"}, {"first_message": None}),
    "inline": ({}, {}),
    "inline-minimal": ({}, {"recipient_name": None, "recipient_email": None, "first_message": None,
                            "template_name": None, "queue_id": None, "variables": {}}),
    "webhook-and-limits": ({"webhook_url": "https://hooks.example/w", "max_duration_seconds": 300,
                            "e164_check": False}, {}),
    "inline-custom-model": ({"model": {"provider": "openai", "model": "gpt-4o"}}, {}),
    "long-email-dropped": ({}, {"recipient_email": "a" * 50 + "@example.com"}),
    "features-leave-message": ({"assistant_id": "as-1"}, {
        "max_duration_seconds": 95, "caller_id": "pn-9", "record": False,
        "voicemail": VoicemailPolicy(True, VoicemailAction.LEAVE_MESSAGE, "Please call back.")}),
    "features-hang-up-inline": ({}, {
        "max_duration_seconds": 5, "record": True, "voicemail": VoicemailPolicy()}),
    "features-detection-off": ({"voicemail_detection_provider": "twilio"}, {
        "max_duration_seconds": 10**6, "voicemail": VoicemailPolicy(detect=False)}),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(BODY_VARIANTS))
def test_every_body_validates_against_create_call_dto(variant: str) -> None:
    settings, req_fields = BODY_VARIANTS[variant]
    body = build_create_body(request(**req_fields), config(**settings))
    validate(body, "CreateCallDTO")


def test_validator_catches_unknown_fields() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    body = build_create_body(request(), config(assistant_id="as"))
    body["type"] = "outboundPhoneCall"
    with pytest.raises(jsonschema.ValidationError):
        validate(body, "CreateCallDTO")


def test_body_carries_script_variables_and_correlation() -> None:
    req = request()
    body = build_create_body(req, config())
    assert body["phoneNumberId"] == "pn-1"
    assert body["customer"] == {
        "number": "+14155550123", "externalId": req.correlation_id, "name": "Ann",
        "email": "ann@example.com",
    }  # fmt: skip
    assert body["assistant"]["model"]["messages"] == [{"role": "system", "content": req.script}]
    assert body["assistant"]["firstMessage"] == req.first_message
    overrides = body["assistantOverrides"]
    assert overrides["variableValues"] == req.variables
    assert overrides["metadata"] == {
        "callq_assignment_id": req.correlation_id, "callq_queue_id": req.queue_id,
    }  # fmt: skip
    with_id = build_create_body(req, config(assistant_id="as-1"))
    assert with_id["assistantId"] == "as-1" and "assistant" not in with_id
    assert with_id["assistantOverrides"]["firstMessage"] == req.first_message


def test_request_features_translate_to_assistant_overrides() -> None:
    policy = VoicemailPolicy(True, VoicemailAction.LEAVE_MESSAGE, "Please call back.")
    req = request(max_duration_seconds=95, caller_id="pn-9", record=False, voicemail=policy)
    body = build_create_body(req, config(max_duration_seconds=600))
    overrides = body["assistantOverrides"]
    assert body["phoneNumberId"] == "pn-9"  # the call's caller id wins over the row's
    assert overrides["maxDurationSeconds"] == 95  # the tighter of request and row
    assert overrides["voicemailDetection"] == {"provider": "vapi"}
    assert overrides["voicemailMessage"] == "Please call back."
    assert overrides["artifactPlan"] == {"recordingEnabled": False}


@pytest.mark.parametrize(
    ("req_fields", "expected"),
    [
        ({}, {}),
        ({"voicemail": VoicemailPolicy(detect=False)}, {"voicemailDetection": "off"}),
        ({"voicemail": VoicemailPolicy()}, {"voicemailDetection": {"provider": "vapi"}}),
        ({"max_duration_seconds": 3}, {"maxDurationSeconds": 10}),
        ({"max_duration_seconds": 50_000}, {"maxDurationSeconds": 43_200}),
        ({"record": True}, {"artifactPlan": {"recordingEnabled": True}}),
    ],
)
def test_request_features_only_when_set(
    req_fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    overrides = build_create_body(request(**req_fields), config())["assistantOverrides"]
    features = {"voicemailDetection", "voicemailMessage", "maxDurationSeconds", "artifactPlan"}
    assert {k: v for k, v in overrides.items() if k in features} == expected


def test_leave_message_policy_needs_text() -> None:
    with pytest.raises(ValueError, match="text"):
        VoicemailPolicy(True, VoicemailAction.LEAVE_MESSAGE, " ")


def test_missing_phone_number_id_is_config_error() -> None:
    bad = ProviderConfig(id="p", provider_type="vapi", api_key="k", config={})
    with pytest.raises(ConfigError, match="phone_number_id"):
        build_create_body(request(), bad)


def test_parses_spec_required_call() -> None:
    call_schema = spec()["components"]["schemas"]["Call"]
    minimal = {name: f"value-{name}" for name in call_schema["required"]}
    minimal["status"] = call_schema["properties"]["status"]["enum"][1]
    status = parse_call(minimal)
    assert status.provider_call_id == "value-id" and status.state is CallState.QUEUED
    validate(fixture("vapi_call_ended.json"), "Call")


def test_parse_ended_call() -> None:
    status = parse_call(fixture("vapi_call_ended.json"))
    assert status.state is CallState.COMPLETED and status.answered
    assert status.ended_reason == "customer-ended-call"
    assert status.duration_seconds == pytest.approx(101.75)
    assert status.cost == pytest.approx(0.1342)
    assert status.recording_url == "https://storage.vapi.ai/0d4c1f4e-mono.wav"
    assert status.transcript and status.transcript.startswith("AI: Hi Ann")
    assert status.correlation_id == "7f6c2b1e-0000-4000-8000-000000000001"
    assert status.started_at is not None and status.started_at.tzinfo is not None


def test_parse_legacy_fields() -> None:
    status = parse_call(fixture("vapi_call_legacy.json"))
    assert status.state is CallState.COMPLETED
    assert status.transcript == "AI: Hello.\nUser: Hi."
    assert status.recording_url and status.recording_url.endswith("legacy.wav")
    assert status.duration_seconds == 90


def test_parse_live_call() -> None:
    status = parse_call(fixture("vapi_call_ringing.json"))
    assert status.state is CallState.RINGING and not status.state.is_terminal
    assert status.ended_at is None and status.correlation_id.endswith("0002")  # type: ignore[union-attr]


def test_failure_after_answer_is_marked_answered() -> None:
    status = parse_call(fixture("vapi_call_failed_after_answer.json"))
    assert status.state is CallState.FAILED_RETRYABLE and status.answered
    before = copy.deepcopy(fixture("vapi_call_failed_after_answer.json"))
    del before["startedAt"], before["artifact"]
    assert not parse_call(before).answered


# --- ended reasons ------------------------------------------------------------------------------


def test_csv_covers_every_spec_ended_reason() -> None:
    values = set(spec()["components"]["schemas"]["Call"]["properties"]["endedReason"]["enum"])
    table = ended_reason_map()
    assert len(values) == 595
    assert values <= set(table)
    assert all(isinstance(v, CallState) for v in table.values())


def sdk_ended_reasons() -> set[str]:
    """Every literal of the official SDK's ``CallEndedReason`` (a light module: typing only)."""
    module = pytest.importorskip("vapi.types.call_ended_reason")
    values: set[str] = set()

    def walk(tp: object) -> None:
        for arg in typing.get_args(tp):
            if isinstance(arg, str):
                values.add(arg)
            else:
                walk(arg)

    walk(module.CallEndedReason)
    return values


def test_map_equals_the_sdk_ended_reason_enum() -> None:
    """A new SDK release that adds or drops a value fails here: classify it in vapi.py."""
    sdk = sdk_ended_reasons()
    table = ended_reason_map()
    assert sorted(sdk - set(table)) == [], "unclassified: add to REASONS_SINCE_SPEC"
    assert sorted(set(table) - sdk) == [], "no longer in the SDK's enum"
    assert len(sdk) == 604


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("sip-outbound-unallocated-number", CallState.FAILED_PERMANENT),
        ("sip-outbound-carrier-released-call", CallState.FAILED_RETRYABLE),
        ("call.start.error-vapifault-worker-not-available", CallState.FAILED_RETRYABLE),
        ("call.start.squad-version-error-validation", CallState.FAILED_PERMANENT),
    ],
)
def test_reasons_added_since_the_spec(reason: str, expected: CallState) -> None:
    assert state_for("ended", reason) is expected


def test_packaged_csv_matches_shared_copy() -> None:
    shared = SHARED / "vapi-ended-reason-map.csv"
    if shared.exists():  # the packaged copy is what runs
        assert shared.read_text() == CSV_PATH.read_text()
    with CSV_PATH.open() as fh:
        assert sum(1 for _ in csv.DictReader(fh)) == 595


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        ("scheduled", None, CallState.QUEUED),
        ("queued", None, CallState.QUEUED),
        ("ringing", None, CallState.RINGING),
        ("in-progress", None, CallState.IN_PROGRESS),
        ("forwarding", None, CallState.IN_PROGRESS),
        ("not-found", None, CallState.FAILED_PERMANENT),
        ("ended", "customer-busy", CallState.BUSY),
        ("ended", "customer-did-not-answer", CallState.NO_ANSWER),
        (
            "ended",
            "call.in-progress.error-providerfault-outbound-sip-408-request-timeout",
            CallState.NO_ANSWER,
        ),
        (
            "ended",
            "call.in-progress.error-providerfault-outbound-sip-480-temporarily-unavailable",
            CallState.NO_ANSWER,
        ),
        (
            "ended",
            "call.in-progress.error-providerfault-outbound-sip-403-forbidden",
            CallState.FAILED_PERMANENT,
        ),
        ("ended", "voicemail", CallState.VOICEMAIL),
        ("ended", "manually-canceled", CallState.CANCELED),
        ("ended", "twilio-reported-customer-misdialed", CallState.FAILED_PERMANENT),
        ("ended", "worker-shutdown", CallState.FAILED_RETRYABLE),
        (
            "ended",
            "call.start.error-subscription-concurrency-limit-reached",
            CallState.FAILED_RETRYABLE,
        ),
        ("ended", "call.start.error-subscription-insufficient-credits", CallState.FAILED_PERMANENT),
        ("ended", "call.in-progress.error-warm-transfer-max-duration", CallState.COMPLETED),
        (
            "ended",
            "call.in-progress.error-vapifault-eleven-labs-system-busy-and-requested-upgrade",
            CallState.FAILED_RETRYABLE,
        ),
        ("ended", "hangup", CallState.FAILED_RETRYABLE),  # not in the enum (docs example)
        ("ended", None, CallState.FAILED_RETRYABLE),
    ],
)
def test_state_mapping(status: str, reason: str | None, expected: CallState) -> None:
    assert state_for(status, reason) is expected


# --- webhooks -----------------------------------------------------------------------------------


def body_of(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_webhook_status_update() -> None:
    event = parse_webhook_payload(fixture("vapi_webhook_status_update.json"))
    assert event.event_type == "status-update"
    assert event.status.state is CallState.IN_PROGRESS
    assert event.provider_call_id == "55555555-6666-4777-8888-999999999999"


def test_webhook_end_of_call_report_merges_message_fields() -> None:
    event = parse_webhook_payload(fixture("vapi_webhook_end_of_call_report.json"))
    assert event.status.state is CallState.BUSY and event.status.ended_reason == "customer-busy"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Vapi-Secret": SECRET},
        {"authorization": f"Bearer {SECRET}"},
        {"HTTP_X_VAPI_SECRET": SECRET},
    ],
)
def test_webhook_secret_headers(headers: dict[str, str]) -> None:
    provider = VapiProvider(config(webhook_secret=SECRET))
    event = provider.parse_webhook(headers, body_of("vapi_webhook_status_update.json"))
    assert event.status.state is CallState.IN_PROGRESS
    provider.close()


def test_webhook_hmac() -> None:
    body = body_of("vapi_webhook_status_update.json")
    ts = str(int(time.time()))
    sig = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    verify_webhook({"x-signature": sig, "x-timestamp": ts}, body, SECRET)
    with pytest.raises(WebhookAuthError):
        verify_webhook({"x-signature": sig, "x-timestamp": ts}, body + b" ", SECRET)
    old = str(int(time.time()) - 3600)
    old_sig = hmac.new(SECRET.encode(), f"{old}.".encode() + body, hashlib.sha256).hexdigest()
    with pytest.raises(WebhookAuthError):
        verify_webhook({"x-signature": old_sig, "x-timestamp": old}, body, SECRET)


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Vapi-Secret": "wrong"}, {"Authorization": "Bearer wrong"}, {"x-signature": "00"}],
)
def test_webhook_rejects_unauthenticated(headers: dict[str, str]) -> None:
    provider = VapiProvider(config(webhook_secret=SECRET))
    with pytest.raises(WebhookAuthError) as info:
        provider.parse_webhook(headers, body_of("vapi_webhook_status_update.json"))
    assert SECRET not in str(info.value)


def test_webhook_without_configured_secret_is_rejected() -> None:
    with pytest.raises(WebhookAuthError):
        VapiProvider(config()).parse_webhook({"X-Vapi-Secret": ""}, b"{}")


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"message": {}}', b'{"message": {"type": "hang"}}',
             b'{"message": {"type": "status-update", "call": {"status": "ended"}}}'],
)  # fmt: skip
def test_webhook_rejects_malformed(body: bytes) -> None:
    provider = VapiProvider(config(webhook_secret=SECRET))
    with pytest.raises(WebhookPayloadError):
        provider.parse_webhook({"X-Vapi-Secret": SECRET}, body)
