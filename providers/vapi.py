"""Vapi adapter: pure translation functions plus a small ``VapiProvider`` over the send path.

API facts: ``https://api.vapi.ai``, bearer key, ``POST /call`` with ``CreateCallDTO`` (unknown
fields are rejected with 400), ``GET /call/{id}``, ``GET /call?createdAtGt=&limit=``.
Correlation: ``customer.externalId`` and ``assistantOverrides.metadata.callq_assignment_id``.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any, ClassVar

import httpx

from providers._http import Sender, timed
from providers._transport import new_client
from providers._util import (
    as_float,
    as_id,
    as_text,
    iso,
    json_object,
    lower_headers,
    parse_time,
    read_call,
    secrets_equal,
)
from providers.base import (
    REPLAY_WINDOW_SECONDS,
    CallHandle,
    CallRequest,
    CallState,
    CallStatus,
    HealthStatus,
    ProviderConfig,
    VoicemailPolicy,
    WebhookEvent,
    clamp_status,
)
from providers.errors import (
    ConfigError,
    ProviderError,
    ProviderOutcomeUnknownError,
    ProviderRetryableError,
    WebhookAuthError,
    WebhookPayloadError,
)

PROVIDER = "vapi"
BASE_URL = "https://api.vapi.ai"
DEFAULT_MODEL = {"provider": "openai", "model": "gpt-4o-mini"}
_PAGE = 100
_MAX_LIMIT = 1000  # GET /call's maximum limit
_MAX_PAGES = 20
_MILLISECOND = timedelta(milliseconds=1)
_MAX_TEXT = 40  # customer.name/email/externalId and call name limits in CreateCallDTO
MIN_DURATION_SECONDS, MAX_DURATION_SECONDS = 10, 43200  # AssistantOverrides.maxDurationSeconds
MAX_VOICEMAIL_MESSAGE = 1000

STATUS_MAP: dict[str, CallState] = {
    "scheduled": CallState.QUEUED,
    "queued": CallState.QUEUED,
    "ringing": CallState.RINGING,
    "in-progress": CallState.IN_PROGRESS,
    "forwarding": CallState.IN_PROGRESS,
    "not-found": CallState.FAILED_PERMANENT,  # undocumented (providers.md Q-V3), provisional
}

# Reviewed deviations from the generated CSV (rows it classified by pattern):
REASON_OVERRIDES: dict[str, CallState] = {
    # "busy ... requested upgrade" is capacity, as the pipeline-error-* twin is classified.
    "call.in-progress.error-vapifault-eleven-labs-system-busy-and-requested-upgrade": (
        CallState.FAILED_RETRYABLE
    ),
}


# Values of the SDK's CallEndedReason (vapi_server_sdk 3.0.0) that the spec copy behind the CSV
# lacks, each reviewed (tests/unit/test_providers_vapi.py compares the map with the SDK's enum):
REASONS_SINCE_SPEC: dict[str, CallState] = {
    # the assistant/squad configuration cannot work: a human must fix it
    "call.in-progress.error-configfault-model-unsupported-in-squad": CallState.FAILED_PERMANENT,
    "call.in-progress.error-configfault-transport-unsupported-for-model": (
        CallState.FAILED_PERMANENT
    ),
    "call.start.squad-version-error-validation": CallState.FAILED_PERMANENT,
    # ElevenLabs capacity: like its "system-busy-and-requested-upgrade" twin, later may work
    "call.in-progress.error-providerfault-eleven-labs-blocked-concurrent-requests-and-requested-upgrade": (  # noqa: E501
        CallState.FAILED_RETRYABLE
    ),
    # the voice was disabled by its owner: retrying cannot bring it back
    "call.in-progress.error-providerfault-eleven-labs-vapi-voice-disabled-by-owner": (
        CallState.FAILED_PERMANENT
    ),
    "call.in-progress.error-providerfault-eleven-labs-voice-disabled-by-owner": (
        CallState.FAILED_PERMANENT
    ),
    # Vapi had no worker to start the call: its own transient fault
    "call.start.error-vapifault-worker-not-available": CallState.FAILED_RETRYABLE,
    # the carrier released the outbound leg (congestion, a network-side drop): try later
    "sip-outbound-carrier-released-call": CallState.FAILED_RETRYABLE,
    # SIP 404 "unallocated number": the number does not exist
    "sip-outbound-unallocated-number": CallState.FAILED_PERMANENT,
}


@cache
def ended_reason_map() -> dict[str, CallState]:
    """Every Vapi ``endedReason`` -> unified state (packaged CSV, the values added since the
    spec copy, and reviewed overrides)."""
    text = resources.files("providers.data").joinpath("vapi-ended-reason-map.csv").read_text()
    table = {
        row["endedReason"]: CallState(row["unified"]) for row in csv.DictReader(text.splitlines())
    }
    table.update(REASONS_SINCE_SPEC)
    table.update(REASON_OVERRIDES)
    return table


def state_for(status: str | None, ended_reason: str | None) -> CallState:
    """Map a Vapi status (and, once ended, its endedReason) to a unified state."""
    if status in STATUS_MAP:
        return STATUS_MAP[status]
    if status in ("ended", "deletion-failed") or (status is None and ended_reason):
        if ended_reason is None:
            return CallState.FAILED_RETRYABLE
        return ended_reason_map().get(ended_reason, CallState.FAILED_RETRYABLE)
    return CallState.QUEUED if status is None else CallState.IN_PROGRESS


# --- request building ---------------------------------------------------------------------------


def build_create_body(req: CallRequest, config: ProviderConfig) -> dict[str, Any]:
    """The ``POST /call`` body (a ``CreateCallDTO``) for ``req``."""
    phone_number_id = req.caller_id or config.setting("phone_number_id")
    if not phone_number_id:
        raise ConfigError(f"vapi provider {config.id}: config.phone_number_id is missing")
    body: dict[str, Any] = {
        "phoneNumberId": str(phone_number_id),
        "customer": _customer(req, config),
        "name": req.correlation_id[:_MAX_TEXT],
        "assistantOverrides": _overrides(req, config),
    }
    assistant_id = config.setting("assistant_id")
    if assistant_id:
        body["assistantId"] = str(assistant_id)
        if req.first_message:
            body["assistantOverrides"]["firstMessage"] = req.first_message
    else:
        body["assistant"] = _inline_assistant(req, config)
    return body


def _customer(req: CallRequest, config: ProviderConfig) -> dict[str, Any]:
    customer: dict[str, Any] = {
        "number": req.to_number,
        "externalId": req.correlation_id[:_MAX_TEXT],
    }
    if req.recipient_name:
        customer["name"] = req.recipient_name[:_MAX_TEXT]
    if req.recipient_email and len(req.recipient_email) <= _MAX_TEXT:
        customer["email"] = req.recipient_email
    if config.setting("e164_check") is False:
        customer["numberE164CheckEnabled"] = False
    return customer


def _metadata(req: CallRequest) -> dict[str, str]:
    meta = {"callq_assignment_id": req.correlation_id}
    if req.queue_id:
        meta["callq_queue_id"] = req.queue_id
    return meta


def _overrides(req: CallRequest, config: ProviderConfig) -> dict[str, Any]:
    overrides: dict[str, Any] = {"variableValues": dict(req.variables), "metadata": _metadata(req)}
    webhook_url = config.setting("webhook_url")
    if webhook_url:
        overrides["server"] = {"url": str(webhook_url)}
    max_duration = max_duration_seconds(req, config)
    if max_duration is not None:
        overrides["maxDurationSeconds"] = max_duration
    if req.voicemail is not None:
        overrides.update(_voicemail(req.voicemail, config))
    if req.record is not None:
        overrides["artifactPlan"] = {"recordingEnabled": req.record}
    return overrides


def max_duration_seconds(req: CallRequest, config: ProviderConfig) -> int | None:
    """The tighter of the request's and the row's cap, within Vapi's 10..43200 seconds."""
    row_cap = config.number("max_duration_seconds", None)
    caps = [int(v) for v in (req.max_duration_seconds, row_cap) if v]
    if not caps:
        return None
    return max(MIN_DURATION_SECONDS, min(min(caps), MAX_DURATION_SECONDS))


def _voicemail(policy: VoicemailPolicy, config: ProviderConfig) -> dict[str, Any]:
    """``voicemailDetection`` ("off" or a detection plan) and, to leave one, ``voicemailMessage``
    (without a message Vapi hangs up on a voicemail box)."""
    if not policy.detect:
        return {"voicemailDetection": "off"}
    detector = str(config.setting("voicemail_detection_provider") or "vapi")
    out: dict[str, Any] = {"voicemailDetection": {"provider": detector}}
    if policy.leaves_message and policy.message:
        out["voicemailMessage"] = policy.message[:MAX_VOICEMAIL_MESSAGE]
    return out


def _inline_assistant(req: CallRequest, config: ProviderConfig) -> dict[str, Any]:
    configured = config.setting("model") or DEFAULT_MODEL
    if not isinstance(configured, Mapping):
        raise ConfigError(f"vapi provider {config.id}: config.model is not an object")
    model = dict(configured)
    model["messages"] = [{"role": "system", "content": req.script or ""}]
    assistant: dict[str, Any] = {"model": model, "metadata": _metadata(req)}
    if req.template_name:
        assistant["name"] = req.template_name[:_MAX_TEXT]
    if req.first_message:
        assistant["firstMessage"] = req.first_message
    return assistant


# --- response parsing ---------------------------------------------------------------------------


def parse_call(call: Mapping[str, Any]) -> CallStatus:
    """A ``Call`` object (or a webhook's merged view of it) as a :class:`CallStatus`."""
    call_id = as_id(call.get("id"))
    if call_id is None:
        raise ValueError("Call has no id")
    status = as_text(call.get("status"))
    reason = as_text(call.get("endedReason"))
    state = state_for(status, reason)
    raw_artifact = call.get("artifact")
    artifact: Mapping[str, Any] = raw_artifact if isinstance(raw_artifact, Mapping) else {}
    transcript = as_text(artifact.get("transcript")) or as_text(call.get("transcript"))
    started = parse_time(call.get("startedAt"))
    ended = parse_time(call.get("endedAt")) if state.is_terminal else None
    duration = (ended - started).total_seconds() if started and ended else None
    return clamp_status(
        CallStatus(
            provider_call_id=call_id,
            state=state,
            ended_reason=reason if state.is_terminal else None,
            started_at=started,
            ended_at=ended,
            duration_seconds=max(duration, 0.0) if duration is not None else None,
            cost=as_float(call.get("cost")),
            recording_url=_recording_url(artifact) or as_text(call.get("recordingUrl")),
            transcript=transcript,
            answered=_answered(state, started, transcript),
            correlation_id=correlation_of(call),
            provider_status=status,
        )
    )


def _parsed(call: Mapping[str, Any]) -> CallStatus:
    """:func:`parse_call` for a call the API returned; unreadable is a provider error."""
    return read_call(parse_call, call, PROVIDER)


def _recording_url(artifact: Mapping[str, Any]) -> str | None:
    url = as_text(artifact.get("recordingUrl"))
    recording = artifact.get("recording")
    if url is None and isinstance(recording, Mapping):
        mono = recording.get("mono")
        url = as_text(mono.get("combinedUrl")) if isinstance(mono, Mapping) else None
        url = url or as_text(recording.get("stereoUrl"))
    return url


def _answered(state: CallState, started: datetime | None, transcript: str | None) -> bool:
    if state in (CallState.IN_PROGRESS, CallState.COMPLETED):
        return True
    if state in (CallState.FAILED_RETRYABLE, CallState.FAILED_PERMANENT):
        # many call.in-progress.error-* reasons happen after the callee picked up
        return started is not None or bool(transcript)
    return False


def correlation_of(call: Mapping[str, Any]) -> str | None:
    """Our assignment id as echoed on a Vapi call (metadata first, then customer.externalId)."""
    for holder in (call.get("assistantOverrides"), call.get("assistant")):
        if isinstance(holder, Mapping) and isinstance(holder.get("metadata"), Mapping):
            found = as_text(holder["metadata"].get("callq_assignment_id"))
            if found:
                return found
    customer = call.get("customer")
    return as_text(customer.get("externalId")) if isinstance(customer, Mapping) else None


def matches(call: Mapping[str, Any], req: CallRequest) -> bool:
    """True when a listed call was created for ``req``."""
    return correlation_of(call) == req.correlation_id or (
        isinstance(call.get("customer"), Mapping)
        and call["customer"].get("externalId") == req.correlation_id[:_MAX_TEXT]
    )


# --- webhooks -----------------------------------------------------------------------------------


def verify_webhook(
    headers: Mapping[str, str], body: bytes, secret: str, *, now: float | None = None
) -> None:
    """Accept ``X-Vapi-Secret``, ``Authorization: Bearer`` or HMAC-SHA256 (``x-signature`` over
    ``{x-timestamp}.{body}``, hex). The HMAC form requires the timestamp, within
    :data:`REPLAY_WINDOW_SECONDS` of now. Raise :class:`WebhookAuthError` otherwise."""
    h = lower_headers(headers)
    if "x-vapi-secret" in h and secrets_equal(h["x-vapi-secret"], secret):
        return
    auth = h.get("authorization", "")
    if auth[:7].lower() == "bearer " and secrets_equal(auth[7:].strip(), secret):
        return
    signature = h.get("x-signature") or h.get("x-vapi-signature")
    if signature:
        timestamp = h.get("x-timestamp", "").strip()
        _check_timestamp(timestamp, now)
        message = timestamp.encode() + b"." + body
        expected = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
        if secrets_equal(signature.removeprefix("sha256=").strip().lower(), expected):
            return
    raise WebhookAuthError("webhook request is not authenticated")


def _check_timestamp(timestamp: str, now: float | None) -> None:
    """Refuse a missing, malformed or stale timestamp (seconds or milliseconds)."""
    if not timestamp.isdigit() or len(timestamp) > 16:
        raise WebhookAuthError("webhook timestamp missing or malformed")
    when = float(timestamp)
    if when > 1e11:
        when /= 1000.0
    if abs((now if now is not None else time.time()) - when) > REPLAY_WINDOW_SECONDS:
        raise WebhookAuthError("webhook timestamp outside the replay window")


def parse_webhook_payload(payload: Mapping[str, Any]) -> WebhookEvent:
    """A ``{"message": {...}}`` server message as a :class:`WebhookEvent`."""
    message = payload.get("message")
    if not isinstance(message, Mapping) or not isinstance(message.get("type"), str):
        raise WebhookPayloadError("no message.type")
    call = message.get("call")
    if not isinstance(call, Mapping) or not as_text(call.get("id")):
        raise WebhookPayloadError("message has no call.id")
    merged = dict(call)
    kind = message["type"]
    if kind == "status-update" and message.get("status"):
        merged["status"] = message["status"]
    if kind == "end-of-call-report":
        merged["status"] = "ended"
    for key in ("endedReason", "startedAt", "endedAt", "cost", "artifact"):
        if message.get(key) is not None:
            merged[key] = message[key]
    try:
        status = parse_call(merged)
    except ValueError as exc:
        raise WebhookPayloadError("call cannot be parsed") from exc
    return WebhookEvent(provider_call_id=status.provider_call_id, status=status, event_type=kind)


def _time_key(value: datetime | None) -> datetime:
    return value if value is not None else datetime.max.replace(tzinfo=UTC)


# --- adapter ------------------------------------------------------------------------------------


class VapiProvider:
    """The Vapi account described by ``config`` (see module docstring)."""

    provider_type = PROVIDER
    official_base_urls: ClassVar[tuple[str, ...]] = (BASE_URL,)

    def __init__(self, config: ProviderConfig, client: httpx.Client | None = None) -> None:
        self.config = config
        self.base_url = (config.base_url or BASE_URL).rstrip("/")
        self._owns_client = client is None
        self._client = client or new_client()
        self._sender = Sender.for_config(PROVIDER, self._client, config)

    def __repr__(self) -> str:
        return f"VapiProvider(id={self.config.id!r}, base_url={self.base_url!r})"

    def create_call(self, req: CallRequest) -> CallHandle:
        """``POST /call``; see :meth:`providers.base.Provider.create_call`."""
        body = build_create_body(req, self.config)
        response = self._sender.request(
            "POST", f"{self.base_url}/call", json_body=body, create=True
        )
        data = self._sender.json(response, create=True)
        call_id = as_id(data.get("id")) if isinstance(data, Mapping) else None
        if call_id is None:
            raise ProviderOutcomeUnknownError(
                "create response has no call id",
                provider=PROVIDER,
                http_status=response.status_code,
            )
        return CallHandle(provider_call_id=call_id, state=state_for(data.get("status"), None))

    def get_call(self, provider_call_id: str) -> CallStatus:
        """``GET /call/{id}``."""
        return _parsed(self._fetch(provider_call_id))

    def _fetch(self, provider_call_id: str) -> Mapping[str, Any]:
        response = self._sender.request("GET", f"{self.base_url}/call/{provider_call_id}")
        data = self._sender.json(response)
        if not isinstance(data, Mapping):
            raise ProviderError("call is not an object", provider=PROVIDER, code="bad_body")
        return data

    def find_call(self, req: CallRequest, since: datetime) -> CallStatus | None:
        """List calls created after ``since`` (newest first) and match our correlation id.

        Pages walk back with ``createdAtLt`` = the oldest ``createdAt`` seen plus 1 ms, so calls
        sharing that millisecond with the page's last one are read again rather than skipped;
        ids already seen are dropped. A full page that cannot move back (it is all one
        millisecond) is read again with a larger ``limit``. When the window holds more calls
        than we read, this raises ``ProviderRetryableError``: keep asking, never re-send.
        """
        seen: set[str] = set()
        params: dict[str, Any] = {"createdAtGt": iso(since), "limit": _PAGE}
        floor: datetime | None = None
        for _ in range(_MAX_PAGES):
            calls = self._list(params)
            for call in calls:
                if str(call.get("id")) not in seen and matches(call, req):
                    return _parsed(call)
            seen.update(str(call.get("id")) for call in calls)
            if len(calls) < params["limit"]:
                return None  # the page ended before the limit: the window is exhausted
            oldest = min((parse_time(c.get("createdAt")) for c in calls), key=_time_key)
            if oldest is None:
                break
            if oldest == floor:  # a full page of one millisecond: widen it
                if params["limit"] >= _MAX_LIMIT:
                    break
                params["limit"] = min(params["limit"] * 10, _MAX_LIMIT)
            floor = oldest
            params["createdAtLt"] = iso(oldest + _MILLISECOND)
        raise ProviderRetryableError(
            "too many calls in the reconcile window", provider=PROVIDER, code="reconcile_window"
        )

    def _list(self, params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        response = self._sender.request("GET", f"{self.base_url}/call", params=params)
        data = self._sender.json(response)
        return [c for c in data if isinstance(c, Mapping)] if isinstance(data, list) else []

    def cancel_call(self, provider_call_id: str) -> bool:
        """Scheduled calls are deleted; live ones are ended through ``monitor.controlUrl``."""
        call = self._fetch(provider_call_id)
        status = call.get("status")
        if status == "scheduled":
            self._sender.request("DELETE", f"{self.base_url}/call/{provider_call_id}")
            return True
        monitor = call.get("monitor")
        control_url = as_text(monitor.get("controlUrl")) if isinstance(monitor, Mapping) else None
        if status in ("ended", "not-found", "deletion-failed") or control_url is None:
            return False
        self._sender.request("POST", control_url, json_body={"type": "end-call"}, auth=False)
        return True

    def check_health(self) -> HealthStatus:
        """``GET /call?limit=1``, one attempt, timed."""
        elapsed, exc = timed(
            lambda: self._sender.request(
                "GET", f"{self.base_url}/call", params={"limit": 1}, retry=False
            )
        )
        if exc is None:
            return HealthStatus(ok=True, latency_ms=elapsed)
        if isinstance(exc, ProviderError):
            return HealthStatus(ok=False, latency_ms=elapsed, detail=str(exc))
        raise exc

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookEvent:
        """Authenticate with the configured ``webhook_secret`` then parse the server message."""
        secret = self.config.webhook_key()
        if secret is None:
            raise WebhookAuthError("no webhook_secret configured")
        verify_webhook(headers, body, secret.get_secret_value())
        return parse_webhook_payload(json_object(body))

    def close(self) -> None:
        """Close the client if this adapter created it."""
        if self._owns_client:
            self._client.close()
