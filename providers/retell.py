"""Retell AI adapter: pure translation functions plus a small ``RetellProvider`` over the send path.

API facts (the ``retell-sdk`` 6.2.13 types are the shape reference): ``https://api.retellai.com``,
bearer key; ``POST /v2/create-phone-call`` (201, a ``PhoneCallResponse``), ``GET
/v2/get-call/{call_id}``, ``POST /v3/list-calls`` (``{filter_criteria, limit, pagination_key}``
-> ``{items, has_more, pagination_key}``), ``POST /v2/stop-call/{call_id}`` (204), ``GET
/get-concurrency``; errors ``{"status": "error", "message": ...}``. Times are epoch
milliseconds; ``call_cost.combined_cost`` is in cents. Correlation:
``metadata.callq_assignment_id``, and the assignment id as ``idempotency_key`` (a repeat within
an hour returns the first call). Webhooks ``{event, call}`` carry ``x-retell-signature:
v=<ms>,d=<hex HMAC-SHA256(key, body + ms)>``, keyed with the account's API key.

The SDK is not called here: its client retries a create after a timeout or a 5xx (a second
dial) and brings its own client, timeouts and errors; the shared ``Sender`` does those once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

import httpx

from providers._http import Sender, timed
from providers._transport import new_client
from providers._util import (
    as_float,
    as_id,
    as_text,
    json_object,
    lower_headers,
    parse_time,
    read_call,
)
from providers.base import (
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
    ProviderPermanentError,
    ProviderRetryableError,
    WebhookAuthError,
    WebhookPayloadError,
)

PROVIDER = "retell"
BASE_URL = "https://api.retellai.com"
ASSIGNMENT_KEY = "callq_assignment_id"
QUEUE_KEY = "callq_queue_id"
SIGNATURE_HEADER = "x-retell-signature"
SIGNATURE = re.compile(r"v=(\d+),d=([0-9a-f]{64})")
WEBHOOK_TOLERANCE_SECONDS = 300.0  # the SDK's verify() allows five minutes
MIN_CALL_MS, MAX_CALL_MS = 60_000, 7_200_000  # agent.max_call_duration_ms bounds
_PAGE = 50
_MAX_PAGES = 20

STATUS_MAP: dict[str, CallState] = {
    "registered": CallState.QUEUED,
    "ongoing": CallState.IN_PROGRESS,
}
TERMINAL_STATUSES = frozenset({"ended", "not_connected", "error"})

# Every value of PhoneCallResponse.disconnection_reason (a unit test compares with the SDK).
DISCONNECTION_REASONS: dict[str, CallState] = {
    # the conversation happened and ended normally
    "user_hangup": CallState.COMPLETED,
    "agent_hangup": CallState.COMPLETED,
    "user_requested_dnc": CallState.COMPLETED,  # a person asked not to be called again
    "user_requested_callback": CallState.COMPLETED,
    "call_transfer": CallState.COMPLETED,
    "transfer_bridged": CallState.COMPLETED,
    "transfer_cancelled": CallState.COMPLETED,
    "inactivity": CallState.COMPLETED,
    "max_duration_reached": CallState.COMPLETED,
    "call_take_over": CallState.COMPLETED,
    # a machine answered, not the person
    "voicemail_reached": CallState.VOICEMAIL,
    "ivr_reached": CallState.VOICEMAIL,
    # never connected
    "dial_busy": CallState.BUSY,
    "user_declined": CallState.BUSY,  # rejected while ringing: like busy, try again later
    "dial_no_answer": CallState.NO_ANSWER,
    "dial_failed": CallState.FAILED_RETRYABLE,
    "telephony_provider_unavailable": CallState.FAILED_RETRYABLE,
    # the number, the route or the account is wrong: retrying cannot help
    "invalid_destination": CallState.FAILED_PERMANENT,
    "telephony_provider_permission_denied": CallState.FAILED_PERMANENT,
    "sip_routing_error": CallState.FAILED_PERMANENT,
    "marked_as_spam": CallState.FAILED_PERMANENT,
    "network_blocked": CallState.FAILED_PERMANENT,
    "scam_detected": CallState.FAILED_PERMANENT,
    "no_valid_payment": CallState.FAILED_PERMANENT,
    "credit_exhausted": CallState.FAILED_PERMANENT,
    "budget_reached": CallState.FAILED_PERMANENT,
    # capacity and Retell-side faults: later may work
    "concurrency_limit_reached": CallState.FAILED_RETRYABLE,
    "no_concurrency_fallback": CallState.FAILED_RETRYABLE,
    "registered_call_timeout": CallState.FAILED_RETRYABLE,
    "error_llm_websocket_open": CallState.FAILED_RETRYABLE,
    "error_llm_websocket_lost_connection": CallState.FAILED_RETRYABLE,
    "error_llm_websocket_runtime": CallState.FAILED_RETRYABLE,
    "error_llm_websocket_corrupt_payload": CallState.FAILED_RETRYABLE,
    "error_no_audio_received": CallState.FAILED_RETRYABLE,
    "error_asr": CallState.FAILED_RETRYABLE,
    "error_retell": CallState.FAILED_RETRYABLE,
    "error_unknown": CallState.FAILED_RETRYABLE,
    "error_user_not_joined": CallState.FAILED_RETRYABLE,
    # stopped through the API
    "manual_stopped": CallState.CANCELED,
}


def state_for(status: str | None, reason: str | None, in_voicemail: bool = False) -> CallState:
    """Map ``call_status`` (and, once ended, ``disconnection_reason``) to a unified state."""
    if status in STATUS_MAP:
        return STATUS_MAP[status]
    if status in TERMINAL_STATUSES:
        state = DISCONNECTION_REASONS.get(reason or "")
        if state is None:
            state = CallState.COMPLETED if status == "ended" else CallState.FAILED_RETRYABLE
        return CallState.VOICEMAIL if state is CallState.COMPLETED and in_voicemail else state
    return CallState.QUEUED if status is None else CallState.IN_PROGRESS


# --- request building ---------------------------------------------------------------------------


def build_create_body(req: CallRequest, config: ProviderConfig) -> dict[str, Any]:
    """The ``POST /v2/create-phone-call`` body (``CallCreatePhoneCallParams``) for ``req``."""
    from_number = req.caller_id or config.setting("from_number")
    if not from_number:
        raise ConfigError(
            f"retell provider {config.name or config.id}: config.from_number is missing"
        )
    metadata = {ASSIGNMENT_KEY: req.correlation_id}
    if req.queue_id:
        metadata[QUEUE_KEY] = req.queue_id
    body: dict[str, Any] = {
        "from_number": str(from_number),
        "to_number": req.to_number,
        "metadata": metadata,
        "retell_llm_dynamic_variables": {k: str(v) for k, v in req.variables.items()},
        "idempotency_key": req.correlation_id,
    }
    agent_id = config.setting("agent_id")
    if agent_id:
        body["override_agent_id"] = str(agent_id)
        version = config.setting("agent_version")
        if version is not None:
            body["override_agent_version"] = version
    override = _agent_override(req, config)
    if override:
        body["agent_override"] = override
    return body


def _agent_override(req: CallRequest, config: ProviderConfig) -> dict[str, Any]:
    agent: dict[str, Any] = {}
    webhook_url = config.setting("webhook_url")
    if webhook_url:
        agent["webhook_url"] = str(webhook_url)
    limit = max_call_duration_ms(req, config)
    if limit is not None:
        agent["max_call_duration_ms"] = limit
    if req.voicemail is not None:
        agent["voicemail_option"] = voicemail_option(req.voicemail)
    if req.record is False:
        # Retell has no recording switch: storing only basic attributes drops the recording
        # (and the transcript); True leaves the agent's own storage setting in place.
        agent["data_storage_setting"] = "basic_attributes_only"
    override: dict[str, Any] = {"agent": agent} if agent else {}
    engine = config.setting("response_engine", "retell_llm")
    if req.first_message and engine == "retell_llm":
        override["retell_llm"] = {"begin_message": req.first_message}
    return override


def max_call_duration_ms(req: CallRequest, config: ProviderConfig) -> int | None:
    """The tighter of the request's and the row's cap, within Retell's 1 min..2 h."""
    row_cap = config.number("max_duration_seconds", None)
    caps = [float(v) for v in (req.max_duration_seconds, row_cap) if v]
    if not caps:
        return None
    return max(MIN_CALL_MS, min(round(min(caps) * 1000), MAX_CALL_MS))


def voicemail_option(policy: VoicemailPolicy) -> dict[str, Any] | None:
    """``agent.voicemail_option``: null turns detection off; else hang up or speak the text."""
    if not policy.detect:
        return None
    if policy.leaves_message and policy.message:
        return {"action": {"type": "static_text", "text": policy.message}}
    return {"action": {"type": "hangup"}}


# --- response parsing ---------------------------------------------------------------------------


def parse_call(call: Mapping[str, Any]) -> CallStatus:
    """A ``PhoneCallResponse`` (or a list item, or a webhook's ``call``) as a ``CallStatus``."""
    call_id = as_id(call.get("call_id"))
    if call_id is None:
        raise ValueError("call has no call_id")
    status = as_text(call.get("call_status"))
    reason = as_text(call.get("disconnection_reason"))
    analysis = call.get("call_analysis")
    in_voicemail = isinstance(analysis, Mapping) and analysis.get("in_voicemail") is True
    state = state_for(status, reason, in_voicemail)
    started = parse_time(call.get("start_timestamp"))
    ended = parse_time(call.get("end_timestamp")) if state.is_terminal else None
    duration_ms = as_float(call.get("duration_ms"))
    duration = duration_ms / 1000.0 if duration_ms is not None else None
    if duration is None and started and ended:
        duration = max((ended - started).total_seconds(), 0.0)
    transcript = as_text(call.get("transcript"))
    return clamp_status(
        CallStatus(
            provider_call_id=call_id,
            state=state,
            ended_reason=reason if state.is_terminal else None,
            started_at=started,
            ended_at=ended,
            duration_seconds=duration if state.is_terminal else None,
            cost=_cost_usd(call.get("call_cost")),
            recording_url=as_text(call.get("recording_url")),
            transcript=transcript,
            answered=_answered(state, status, started, transcript, duration),
            correlation_id=correlation_of(call),
            provider_status=status,
        )
    )


def _parsed(call: Mapping[str, Any]) -> CallStatus:
    """:func:`parse_call` for a call the API returned; unreadable is a provider error."""
    return read_call(parse_call, call, PROVIDER)


def _cost_usd(cost: object) -> float | None:
    cents = as_float(cost.get("combined_cost")) if isinstance(cost, Mapping) else None
    return None if cents is None else round(cents / 100.0, 6)


def _answered(
    state: CallState,
    status: str | None,
    started: datetime | None,
    transcript: str | None,
    duration: float | None,
) -> bool:
    if state in (CallState.IN_PROGRESS, CallState.COMPLETED):
        return True
    if state in (CallState.FAILED_RETRYABLE, CallState.FAILED_PERMANENT):
        # an error after pickup ("error" status, a transcript, talk time) was a conversation
        return status != "not_connected" and (
            started is not None or bool(transcript) or bool(duration)
        )
    return False


def correlation_of(call: Mapping[str, Any]) -> str | None:
    """Our assignment id as echoed in the call's ``metadata``."""
    metadata = call.get("metadata")
    return as_text(metadata.get(ASSIGNMENT_KEY)) if isinstance(metadata, Mapping) else None


def list_body(req: CallRequest, pagination_key: str | None = None) -> dict[str, Any]:
    """``POST /v3/list-calls`` for the calls made for ``req`` (by metadata), newest first."""
    criteria = {
        "metadata": [
            {"key": ASSIGNMENT_KEY, "type": "string", "op": "eq", "value": req.correlation_id}
        ]
    }
    body: dict[str, Any] = {"filter_criteria": criteria, "limit": _PAGE, "sort_order": "descending"}
    if pagination_key:
        body["pagination_key"] = pagination_key
    return body


# --- webhooks -----------------------------------------------------------------------------------


def sign(body: bytes, key: str, timestamp_ms: int) -> str:
    """Retell's ``x-retell-signature`` value for ``body`` at ``timestamp_ms``."""
    digest = hmac.new(key.encode(), body + str(timestamp_ms).encode(), hashlib.sha256)
    return f"v={timestamp_ms},d={digest.hexdigest()}"


def verify_webhook(
    headers: Mapping[str, str], body: bytes, key: str, *, now: float | None = None
) -> None:
    """Check ``x-retell-signature`` as the SDK's ``verify`` does (5 min tolerance)."""
    signature = lower_headers(headers).get(SIGNATURE_HEADER, "").strip()
    match = SIGNATURE.fullmatch(signature)
    if match is None:
        raise WebhookAuthError("missing or malformed signature")
    stamp = int(match.group(1))
    if (
        abs((now if now is not None else time.time()) * 1000 - stamp)
        > WEBHOOK_TOLERANCE_SECONDS * 1000
    ):
        raise WebhookAuthError("webhook timestamp outside tolerance")
    if not hmac.compare_digest(sign(body, key, stamp), f"v={stamp},d={match.group(2)}"):
        raise WebhookAuthError("bad signature")


def parse_webhook_payload(payload: Mapping[str, Any]) -> WebhookEvent:
    """``{event, call}`` as a :class:`WebhookEvent` (``call_started|call_ended|call_analyzed``)."""
    event = payload.get("event")
    call = payload.get("call")
    if not isinstance(event, str) or not isinstance(call, Mapping):
        raise WebhookPayloadError("no event or call")
    try:
        status = parse_call(call)
    except ValueError as exc:
        raise WebhookPayloadError("call cannot be parsed") from exc
    return WebhookEvent(provider_call_id=status.provider_call_id, status=status, event_type=event)


# --- adapter ------------------------------------------------------------------------------------


class RetellProvider:
    """The Retell account described by ``config`` (see module docstring)."""

    provider_type = PROVIDER
    official_base_urls: ClassVar[tuple[str, ...]] = (BASE_URL,)

    def __init__(self, config: ProviderConfig, client: httpx.Client | None = None) -> None:
        self.config = config
        self.base_url = (config.base_url or BASE_URL).rstrip("/")
        self._owns_client = client is None
        self._client = client or new_client()
        self._sender = Sender.for_config(PROVIDER, self._client, config)

    def __repr__(self) -> str:
        return f"RetellProvider(id={self.config.id!r}, base_url={self.base_url!r})"

    def create_call(self, req: CallRequest) -> CallHandle:
        """``POST /v2/create-phone-call``; see :meth:`providers.base.Provider.create_call`."""
        body = build_create_body(req, self.config)
        url = f"{self.base_url}/v2/create-phone-call"
        response = self._sender.request("POST", url, json_body=body, create=True)
        data = self._sender.json(response, create=True)
        call_id = as_text(data.get("call_id")) if isinstance(data, Mapping) else None
        if call_id is None:
            raise ProviderOutcomeUnknownError(
                "create response has no call_id", provider=PROVIDER,
                http_status=response.status_code,
            )  # fmt: skip
        return CallHandle(provider_call_id=call_id, state=parse_call(data).state)

    def get_call(self, provider_call_id: str) -> CallStatus:
        """``GET /v2/get-call/{call_id}``."""
        return _parsed(self._fetch(provider_call_id))

    def _fetch(self, provider_call_id: str) -> Mapping[str, Any]:
        url = f"{self.base_url}/v2/get-call/{provider_call_id}"
        data = self._sender.json(self._sender.request("GET", url))
        if not isinstance(data, Mapping):
            raise ProviderError("call is not an object", provider=PROVIDER, code="bad_body")
        return data

    def find_call(self, req: CallRequest, since: datetime) -> CallStatus | None:
        """``POST /v3/list-calls`` filtered by our metadata; every page is read before "none".

        ``since`` is not sent: a call that never connected has no ``start_timestamp`` to filter
        on, and the correlation id alone is exact.
        """
        key: str | None = None
        for _ in range(_MAX_PAGES):
            response = self._sender.request(
                "POST", f"{self.base_url}/v3/list-calls", json_body=list_body(req, key)
            )
            data = self._sender.json(response)
            items = data.get("items") if isinstance(data, Mapping) else None
            for item in items if isinstance(items, list) else []:
                if isinstance(item, Mapping) and correlation_of(item) == req.correlation_id:
                    return _parsed(item)
            key = as_text(data.get("pagination_key")) if isinstance(data, Mapping) else None
            if not (isinstance(data, Mapping) and data.get("has_more") and key):
                return None
        raise ProviderRetryableError(
            "too many calls in the reconcile window", provider=PROVIDER, code="reconcile_window"
        )

    def cancel_call(self, provider_call_id: str) -> bool:
        """``POST /v2/stop-call/{call_id}`` for a call not yet ended; False once it has."""
        if parse_call(self._fetch(provider_call_id)).state.is_terminal:
            return False
        try:
            self._sender.request("POST", f"{self.base_url}/v2/stop-call/{provider_call_id}")
        except ProviderPermanentError as exc:
            if exc.http_status in (400, 404):  # it ended meanwhile
                return False
            raise
        return True

    def check_health(self) -> HealthStatus:
        """``GET /get-concurrency``, one attempt, timed."""
        elapsed, exc = timed(
            lambda: self._sender.request("GET", f"{self.base_url}/get-concurrency", retry=False)
        )
        if exc is None:
            return HealthStatus(ok=True, latency_ms=elapsed)
        if isinstance(exc, ProviderError):
            return HealthStatus(ok=False, latency_ms=elapsed, detail=str(exc))
        raise exc

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookEvent:
        """Verify ``x-retell-signature`` with ``webhook_secret`` (else the API key, which Retell
        signs with), then parse."""
        key = self.config.webhook_key() or self.config.api_key
        verify_webhook(headers, body, key.get_secret_value())
        return parse_webhook_payload(json_object(body))

    def close(self) -> None:
        """Close the client if this adapter created it."""
        if self._owns_client:
            self._client.close()
