"""SynthFlow adapter: pure translation functions plus a small ``SynthflowProvider``.

API facts: ``https://api.synthflow.ai/v2``, bearer key, ``POST /calls``
``{model_id, phone, name, custom_variables: [{key, value}], prompt?, greeting?, ...}``,
``GET /calls/{id}`` and ``GET /calls?model_id=...`` (both wrapped in ``{status, response}``).
About 1 create per second (CAPS); no cancel endpoint; webhooks signed with
base64 HMAC-SHA256 of the ``call_id``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
    secrets_equal,
)
from providers.base import (
    CallHandle,
    CallRequest,
    CallState,
    CallStatus,
    HealthStatus,
    ProviderConfig,
    WebhookEvent,
    clamp_status,
)
from providers.errors import (
    ConfigError,
    ProviderError,
    ProviderOutcomeUnknownError,
    ProviderUnprovenMatchError,
    WebhookAuthError,
    WebhookPayloadError,
)

PROVIDER = "synthflow"
BASE_URL = "https://api.synthflow.ai/v2"
# Global, US and EU workspaces (providers.md 2.1).
OFFICIAL_BASE_URLS = (BASE_URL, "https://api.us.synthflow.ai/v2", "https://api.eu.synthflow.ai/v2")
DEFAULT_CREATES_PER_SECOND = 1.0
ASSIGNMENT_VAR = "callq_assignment_id"
QUEUE_VAR = "callq_queue_id"
SIGNATURE_HEADERS = ("synthflow-signature", "x-synthflow-signature")

STATUS_MAP: dict[str, CallState] = {
    "pending": CallState.QUEUED,
    "registered": CallState.QUEUED,
    "paused": CallState.QUEUED,  # undocumented (providers.md Q-S5), provisional
    "ringing": CallState.RINGING,
    "in-progress": CallState.IN_PROGRESS,
    "hangup_on_voicemail": CallState.VOICEMAIL,
    "left_voicemail": CallState.VOICEMAIL,
    "no-answer": CallState.NO_ANSWER,
    "busy": CallState.BUSY,
    "canceled": CallState.CANCELED,
    "user-canceled": CallState.CANCELED,
    "spam": CallState.FAILED_PERMANENT,
}
VOICEMAIL_REASONS = frozenset({"voicemail", "voicemail_cut_off", "voicemail_message_left"})
# failed + error_message fragments that retrying cannot fix (providers.md section 5.2)
PERMANENT_ERRORS = (
    "invalid phone number",
    "404",
    "604",
    "not found",
    "608",
    "rejected",
    "insufficient minutes",
    "401",
    "403",
)


def state_for(status: str | None, end_reason: str | None, error_message: str | None) -> CallState:
    """Map status + end_call_reason + error_message (both reason vocabularies) to a state."""
    if status in STATUS_MAP:
        return STATUS_MAP[status]
    reason = (end_reason or "").lower()
    error = (error_message or "").lower()
    if status == "completed":
        if reason in VOICEMAIL_REASONS:
            return CallState.VOICEMAIL
        return CallState.FAILED_RETRYABLE if reason == "error" else CallState.COMPLETED
    if status == "failed":
        if "429" in error or "rate limit" in error:
            return CallState.FAILED_RETRYABLE
        if any(fragment in error for fragment in PERMANENT_ERRORS):
            return CallState.FAILED_PERMANENT
        return CallState.FAILED_RETRYABLE
    return CallState.QUEUED if status is None else CallState.IN_PROGRESS


# --- request building ---------------------------------------------------------------------------


def build_create_body(req: CallRequest, config: ProviderConfig) -> dict[str, Any]:
    """The ``POST /calls`` body for ``req``; our ids travel as custom variables."""
    model_id = config.setting("model_id")
    if not model_id:
        raise ConfigError(f"synthflow provider {config.id}: config.model_id is missing")
    variables = dict(req.variables)
    variables[ASSIGNMENT_VAR] = req.correlation_id
    if req.queue_id:
        variables[QUEUE_VAR] = req.queue_id
    body: dict[str, Any] = {
        "model_id": str(model_id),
        "phone": req.to_number,
        "name": req.recipient_name or "",
        "custom_variables": [{"key": k, "value": str(v)} for k, v in variables.items()],
    }
    if req.script and config.setting("send_prompt", True):
        body["prompt"] = req.script
    if req.first_message:
        body["greeting"] = req.first_message
    if req.recipient_email:
        body["lead_email"] = req.recipient_email
    # max duration, voicemail handling and recording are agent settings at SynthFlow: the
    # create body has no field for them (see providers/README.md), so they are not sent.
    from_number = req.caller_id or config.setting("from_phone_number")
    if from_number:
        body["from_phone_number"] = str(from_number)
    return body


# --- response parsing ---------------------------------------------------------------------------


def parse_create_response(data: object) -> str | None:
    """The new call id from ``{status, response: {answer, call_id}}``, or None."""
    if isinstance(data, Mapping) and isinstance(data.get("response"), Mapping):
        return as_id(data["response"].get("call_id"))
    return None


def calls_of(data: object) -> list[Mapping[str, Any]]:
    """The call items of a get/list response ``{status, response: {pagination, calls}}``."""
    if not isinstance(data, Mapping) or not isinstance(data.get("response"), Mapping):
        return []
    calls = data["response"].get("calls")
    return [c for c in calls if isinstance(c, Mapping)] if isinstance(calls, list) else []


def parse_call(item: Mapping[str, Any]) -> CallStatus:
    """A get-call item, list item or webhook ``call`` object as a :class:`CallStatus`."""
    call_id = as_id(item.get("call_id"))
    if call_id is None:
        raise ValueError("call has no call_id")
    status = as_text(item.get("status")) or as_text(item.get("call_status"))
    reason = as_text(item.get("end_call_reason"))
    error = as_text(item.get("error_message"))
    if status == "completed" and reason == "completed" and error:  # old webhook example
        reason, error = error, None
    state = state_for(status, reason, error)
    started = parse_time(item.get("start_time"))
    duration = as_float(item.get("duration")) if state.is_terminal else None
    transcript = as_text(item.get("transcript"))
    answered = state in (CallState.IN_PROGRESS, CallState.COMPLETED) or (
        state in (CallState.FAILED_RETRYABLE, CallState.FAILED_PERMANENT)
        and (bool(transcript) or bool(duration))
    )
    # clamp_status checks the numbers and times, and derives the end from start + duration
    return clamp_status(
        CallStatus(
            provider_call_id=call_id,
            state=state,
            ended_reason=(reason or error) if state.is_terminal else None,
            started_at=started,
            ended_at=None,
            duration_seconds=duration,
            cost=None,  # SynthFlow reports no cost
            recording_url=as_text(item.get("recording_url")),
            transcript=transcript,
            answered=answered,
            correlation_id=correlation_of(item),
            provider_status=status,
        )
    )


def _parsed(item: Mapping[str, Any]) -> CallStatus:
    """:func:`parse_call` for a call the API returned; unreadable is a provider error."""
    return read_call(parse_call, item, PROVIDER)


def correlation_of(item: Mapping[str, Any]) -> str | None:
    """Our assignment id if the provider echoed our custom variables on the call."""
    for key in ("prompt_variables", "custom_variables", "variables"):
        holder = item.get(key)
        if isinstance(holder, Mapping) and as_text(holder.get(ASSIGNMENT_VAR)):
            return str(holder[ASSIGNMENT_VAR])
        if isinstance(holder, list):
            for pair in holder:
                if isinstance(pair, Mapping) and pair.get("key") == ASSIGNMENT_VAR:
                    return as_text(pair.get("value"))
    return as_text(item.get("external_id"))


def pick_match(
    items: list[Mapping[str, Any]], req: CallRequest, since: datetime
) -> Mapping[str, Any] | None:
    """The listed call made for ``req``, proven by our correlation id echoed on it; else None.

    A call to the same number since ``since`` that echoes no correlation id at all may be ours
    or anyone's (another tenant dials the same number through the same agent): raise
    :class:`ProviderUnprovenMatchError` rather than adopt it or report "not found".
    """
    unproven = False
    for item in items:
        echoed = correlation_of(item)
        if echoed == req.correlation_id:
            return item
        if echoed is None and _same_number_since(item, req, since):
            unproven = True
    if unproven:
        raise ProviderUnprovenMatchError(
            "a call to the number carries no correlation id", provider=PROVIDER, code="unproven"
        )
    return None


def _same_number_since(item: Mapping[str, Any], req: CallRequest, since: datetime) -> bool:
    phone = item.get("lead_phone_number") or item.get("phone_number_to")
    started = parse_time(item.get("start_time"))
    return phone == req.to_number and (started is None or started >= since)


# --- webhooks -----------------------------------------------------------------------------------


def sign(call_id: str, secret: str) -> str:
    """SynthFlow's signature: base64 HMAC-SHA256 of the call id with the workspace secret."""
    digest = hmac.new(secret.encode(), call_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def parse_webhook_request(headers: Mapping[str, str], body: bytes, secret: str) -> WebhookEvent:
    """Authenticate (signature over ``call.call_id``) and parse a post-call webhook."""
    h = lower_headers(headers)
    signature = next((h[name] for name in SIGNATURE_HEADERS if name in h), None)
    if not signature:
        raise WebhookAuthError("missing signature header")
    payload = json_object(body)
    call = payload.get("call")
    if not isinstance(call, Mapping) or not as_text(call.get("call_id")):
        raise WebhookPayloadError("payload has no call.call_id")
    if not secrets_equal(signature.strip(), sign(str(call["call_id"]), secret)):
        raise WebhookAuthError("bad signature")
    item = dict(call)
    if not item.get("status") and payload.get("status"):
        item["status"] = payload["status"]
    if not item.get("error_message") and payload.get("error_message"):
        item["error_message"] = payload["error_message"]
    status = parse_call(item)
    return WebhookEvent(
        provider_call_id=status.provider_call_id, status=status, event_type="post-call"
    )


# --- adapter ------------------------------------------------------------------------------------


class SynthflowProvider:
    """The SynthFlow workspace described by ``config`` (see module docstring)."""

    provider_type = PROVIDER
    official_base_urls: ClassVar[tuple[str, ...]] = OFFICIAL_BASE_URLS

    def __init__(self, config: ProviderConfig, client: httpx.Client | None = None) -> None:
        self.config = config
        self.base_url = (config.base_url or BASE_URL).rstrip("/")
        self._owns_client = client is None
        self._client = client or new_client()
        self._sender = Sender.for_config(PROVIDER, self._client, config, DEFAULT_CREATES_PER_SECOND)

    def __repr__(self) -> str:
        return f"SynthflowProvider(id={self.config.id!r}, base_url={self.base_url!r})"

    def create_call(self, req: CallRequest) -> CallHandle:
        """``POST /calls``; success is HTTP 200 plus ``response.call_id``."""
        body = build_create_body(req, self.config)
        response = self._sender.request(
            "POST", f"{self.base_url}/calls", json_body=body, create=True
        )
        call_id = parse_create_response(self._sender.json(response, create=True))
        if call_id is None:
            raise ProviderOutcomeUnknownError(
                "create response has no call_id",
                provider=PROVIDER,
                http_status=response.status_code,
            )
        return CallHandle(provider_call_id=call_id, state=CallState.QUEUED)

    def get_call(self, provider_call_id: str) -> CallStatus:
        """``GET /calls/{id}`` (a one-item page)."""
        response = self._sender.request("GET", f"{self.base_url}/calls/{provider_call_id}")
        items = calls_of(self._sender.json(response))
        if not items:
            raise ProviderError("call missing from response", provider=PROVIDER, code="empty_page")
        return _parsed(items[0])

    def find_call(self, req: CallRequest, since: datetime) -> CallStatus | None:
        """``GET /calls?model_id=&lead_phone_number=&from_date=<ms>`` and match on our
        correlation id only (see :func:`pick_match`). The number narrows the list at the
        provider, which has it anyway; httpx's request log, which would show it, is off."""
        params = {
            "model_id": str(self.config.setting("model_id") or ""),
            "lead_phone_number": req.to_number,
            "from_date": int(since.timestamp() * 1000),
            "limit": 100,
        }
        response = self._sender.request("GET", f"{self.base_url}/calls", params=params)
        found = pick_match(calls_of(self._sender.json(response)), req, since)
        return _parsed(found) if found is not None else None

    def cancel_call(self, provider_call_id: str) -> bool:
        """SynthFlow documents no way to stop a call."""
        return False

    def check_health(self) -> HealthStatus:
        """``GET /calls?model_id=&limit=1``, one attempt, timed."""
        params = {"model_id": str(self.config.setting("model_id") or ""), "limit": 1}
        elapsed, exc = timed(
            lambda: self._sender.request(
                "GET", f"{self.base_url}/calls", params=params, retry=False
            )
        )
        if exc is None:
            return HealthStatus(ok=True, latency_ms=elapsed)
        if isinstance(exc, ProviderError):
            return HealthStatus(ok=False, latency_ms=elapsed, detail=str(exc))
        raise exc

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookEvent:
        """Verify ``Synthflow-Signature`` with the configured ``webhook_secret``, then parse."""
        secret = self.config.webhook_key()
        if secret is None:
            raise WebhookAuthError("no webhook_secret configured")
        return parse_webhook_request(headers, body, secret.get_secret_value())

    def close(self) -> None:
        """Close the client if this adapter created it."""
        if self._owns_client:
            self._client.close()
