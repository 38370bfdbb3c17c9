"""Decisions about a call: plain values in, plain values out (no Celery, no httpx, no SQL).

- :func:`decide_outcome`: a provider's call state -> complete, fail (which kind) or keep polling.
- :func:`decide_error`: a provider error raised while placing a call -> what to do next.
- :func:`decide_setup_error`: an error raised before any request left -> fail over.
- :func:`next_poll_delay`: the growing interval between polls of a placed call.
- :func:`decide_webhook`: an authenticated webhook -> end the call from it, re-read it, or wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from providers.base import CallState, CallStatus, WebhookEvent
from providers.errors import (
    ConfigError,
    ProviderError,
    ProviderOutcomeUnknownError,
    ProviderPermanentError,
    ProviderRetryableError,
    ProviderThrottledError,
)

# Failure kinds understood by handle_failed_call().
BUSY = "busy"
NO_ANSWER = "no_answer"
VOICEMAIL = "voicemail"
PROVIDER_ERROR = "provider_error"
RATE_LIMITED = "rate_limited"
PERMANENT = "permanent"
CANCELED = "canceled"
FAILURE_KINDS = frozenset(
    {BUSY, NO_ANSWER, VOICEMAIL, PROVIDER_ERROR, RATE_LIMITED, PERMANENT, CANCELED}
)  # the same set as SQL's failure_kinds() (tests/integration/test_db_queue.py compares them)


@dataclass(frozen=True)
class Complete:
    """The call ended with a conversation: write history and usage."""


@dataclass(frozen=True)
class Fail:
    """The call ended without one: hand it to handle_failed_call with this kind."""

    kind: str
    error: str | None = None
    retry_after_seconds: int | None = None


@dataclass(frozen=True)
class KeepPolling:
    """The call has not ended yet."""


@dataclass(frozen=True)
class Reconcile:
    """The create may have reached the provider: look the call up before anything is re-sent."""


@dataclass(frozen=True)
class Release:
    """Nothing was sent: give the call back to the queue (no attempt used), due after a delay."""

    reason: str
    delay_seconds: float


Decision = Complete | Fail | KeepPolling
ErrorDecision = Fail | Reconcile | Release

_FAIL_KIND_BY_STATE = {
    CallState.BUSY: BUSY,
    CallState.NO_ANSWER: NO_ANSWER,
    CallState.VOICEMAIL: VOICEMAIL,
    CallState.FAILED_RETRYABLE: PROVIDER_ERROR,
    CallState.FAILED_PERMANENT: PERMANENT,
    CallState.CANCELED: CANCELED,
}


def decide_outcome(status: CallStatus) -> Decision:
    """Map a polled or webhook-reported call state to the next step."""
    if not status.state.is_terminal:
        return KeepPolling()
    if status.state is CallState.COMPLETED:
        return Complete()
    if status.state is CallState.FAILED_RETRYABLE and status.answered:
        # Somebody talked to the assistant before the failure: never dial them again for it.
        return Complete()
    return Fail(_FAIL_KIND_BY_STATE[status.state], status.ended_reason)


def decide_error(exc: ProviderError) -> ErrorDecision:
    """What to do after ``create_call`` raised ``exc``."""
    if isinstance(exc, ProviderOutcomeUnknownError):
        return Reconcile()
    if isinstance(exc, ProviderThrottledError):
        # our own create pacing: back to the queue until a token would be free
        return Release(exc.code or "client_throttle", max(1.0, exc.retry_after or 0.0))
    if isinstance(exc, ProviderPermanentError):
        return Fail(PERMANENT, _error_text(exc))
    if isinstance(exc, ProviderRetryableError) and exc.http_status == 429:
        retry_after = math.ceil(exc.retry_after) if exc.retry_after else None
        return Fail(RATE_LIMITED, _error_text(exc), retry_after)
    return Fail(PROVIDER_ERROR, _error_text(exc))


def decide_setup_error(exc: Exception) -> Fail:
    """What to do after building the adapter or the request failed: nothing was sent, so the
    call may go to another provider (a provider error, which excludes this one next time).

    The reason names the error type; a ``ConfigError`` also says what is wrong (its messages
    carry field names and references, never values, by contract).
    """
    if isinstance(exc, ConfigError):
        return Fail(PROVIDER_ERROR, f"config_error: {str(exc)[:300]}")
    return Fail(PROVIDER_ERROR, f"setup failed before any request: {type(exc).__name__}")


class WebhookAction(StrEnum):
    """What an authenticated webhook delivery leads to."""

    FINISH = "finish"  # the provider's final report: end the call from it, no further read
    CHECK = "check"  # a hint: read the call once from the provider's API
    IGNORE = "ignore"  # nothing to do now (the final report follows; polling is the safety net)


# Final reports whose whole body is authenticated: Vapi's end-of-call-report (secret header or
# an HMAC over the body) and Retell's call_ended (an HMAC over the body). SynthFlow's post-call
# signature covers only the call id, so its body is a hint and the call is re-read.
FINAL_REPORTS = frozenset({"end-of-call-report", "call_ended"})
HINTS = frozenset({"post-call"})


def decide_webhook(event: WebhookEvent) -> WebhookAction:
    """Vapi sends a status-update as a call ends and then its end-of-call-report: the report
    ends the call; a status-update changes nothing (a lost report is caught by polling)."""
    if event.event_type in FINAL_REPORTS and event.status.state.is_terminal:
        return WebhookAction.FINISH
    if event.event_type in HINTS:
        return WebhookAction.CHECK
    return WebhookAction.IGNORE


def decide_unproven_match() -> Fail:
    """Reconcile saw, until its last lookup, a call that may be ours but carries no proof.

    Adopting it could take another tenant's call (and its transcript); dialing again could
    ring the person twice. The call ends, failed and not retried, saying why.
    """
    return Fail(
        PERMANENT, "create outcome unknown: an unproven match at the provider; not redialed"
    )


def next_poll_delay(poll_count: int, initial: float, factor: float, maximum: float) -> float:
    """Seconds before poll number ``poll_count + 1``: ``initial * factor**n``, capped."""
    return float(min(maximum, initial * factor ** max(0, poll_count)))


# A safety-net poll waits its interval stretched by up to this share, drawn per poll.
SAFETY_NET_SPREAD = 0.25


def safety_net_delay(interval: float, draw: float) -> float:
    """Seconds before the next safety-net poll of a call whose end its provider reports by
    webhook: ``interval`` stretched by ``draw`` (in [0, 1)) times ``SAFETY_NET_SPREAD``. Calls
    placed together would otherwise poll together for as long as they last (a thousand reads
    in one tick every interval), and at each whole multiple of the interval with the webhooks
    of the calls that end there."""
    return interval * (1.0 + SAFETY_NET_SPREAD * min(max(draw, 0.0), 1.0))


def _error_text(exc: ProviderError) -> str:
    code = exc.code or (f"http_{exc.http_status}" if exc.http_status else type(exc).__name__)
    return f"{exc.provider or 'provider'}: {code}"
