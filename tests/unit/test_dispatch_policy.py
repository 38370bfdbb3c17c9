"""dispatch.policy: call states and provider errors -> the next step."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.policy import (
    Complete,
    Fail,
    KeepPolling,
    Reconcile,
    decide_error,
    decide_outcome,
    next_poll_delay,
    safety_net_delay,
)
from dispatch.request import build_call_request
from models.calls import CallRow
from providers.base import CallState, CallStatus, VoicemailAction, VoicemailPolicy
from providers.errors import (
    ProviderOutcomeUnknownError,
    ProviderPermanentError,
    ProviderRetryableError,
)


def status(state: CallState, *, answered: bool = False, reason: str | None = None) -> CallStatus:
    return CallStatus(provider_call_id="c1", state=state, answered=answered, ended_reason=reason)


@pytest.mark.parametrize("state", [CallState.QUEUED, CallState.RINGING, CallState.IN_PROGRESS])
def test_live_calls_keep_polling(state: CallState) -> None:
    assert decide_outcome(status(state)) == KeepPolling()


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        (CallState.BUSY, "busy"),
        (CallState.NO_ANSWER, "no_answer"),
        (CallState.VOICEMAIL, "voicemail"),
        (CallState.FAILED_RETRYABLE, "provider_error"),
        (CallState.FAILED_PERMANENT, "permanent"),
        (CallState.CANCELED, "canceled"),
    ],
)
def test_unanswered_endings_fail_with_their_kind(state: CallState, kind: str) -> None:
    decision = decide_outcome(status(state, reason="why"))
    assert decision == Fail(kind, "why")


def test_completed_call_completes() -> None:
    assert decide_outcome(status(CallState.COMPLETED)) == Complete()


def test_answered_call_that_failed_later_is_never_redialed() -> None:
    assert decide_outcome(status(CallState.FAILED_RETRYABLE, answered=True)) == Complete()


def test_outcome_unknown_create_reconciles_instead_of_resending() -> None:
    exc = ProviderOutcomeUnknownError("read timeout", provider="vapi")
    assert decide_error(exc) == Reconcile()


def test_rate_limit_carries_retry_after_rounded_up() -> None:
    exc = ProviderRetryableError("429", provider="vapi", http_status=429, retry_after=2.2)
    assert decide_error(exc) == Fail("rate_limited", "vapi: http_429", 3)


def test_connect_error_fails_over_as_provider_error() -> None:
    exc = ProviderRetryableError("refused", provider="synthflow", code="connect_error")
    assert decide_error(exc) == Fail("provider_error", "synthflow: connect_error")


def test_permanent_error_fails_the_call() -> None:
    exc = ProviderPermanentError("bad", provider="vapi", http_status=400, code="invalid_number")
    decision = decide_error(exc)
    assert isinstance(decision, Fail) and decision.kind == "permanent"


def test_poll_delay_grows_and_is_capped() -> None:
    delays = [next_poll_delay(n, 2.0, 2.0, 30.0) for n in range(6)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def call_row(**columns: Any) -> CallRow:
    """A loaded call as ``LOAD_CALL`` returns it, with ``columns`` over plain defaults."""
    base: dict[str, Any] = dict.fromkeys(
        ("provider_call_id", "dialing_at", "recipient_name", "recipient_email", "custom_variables",
         "template_name", "script", "first_message", "api_key", "api_secret", "base_url",
         "max_concurrent_calls", "capabilities", "config"),
    )  # fmt: skip
    base |= {"assignment_id": uuid4(), "state": "dialing", "attempt": 1, "poll_count": 0}
    base |= {"queue_id": uuid4(), "queue_status": "dialing", "recipient_phone": "+15551234567"}
    base |= {"provider_id": uuid4(), "provider_name": "Vapi", "provider_type": "vapi"}
    return CallRow.from_row(base | columns)


def test_request_carries_ids_and_string_variables() -> None:
    call = call_row(
        recipient_name="John",
        custom_variables={"company_name": "Acme", "seats": 3, "tags": ["a"]},
        script="Hello {{company_name}}",
    )
    req = build_call_request(call)
    assert "+15551234567" not in repr(call) and "John" not in repr(call)
    assert (req.correlation_id, req.queue_id) == (str(call.assignment_id), str(call.queue_id))
    assert req.variables == {
        "company_name": "Acme",
        "seats": "3",
        "tags": '["a"]',
        "recipient_name": "John",
    }
    assert "+15551234567" not in repr(req)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ({}, None),
        ({"voicemail_detection": None, "voicemail_action": "leave_message"}, None),
        ({"voicemail_detection": False, "voicemail_action": "hang_up"}, VoicemailPolicy(False)),
        ({"voicemail_detection": True, "voicemail_action": "hang_up", "voicemail_message": "x"},
         VoicemailPolicy(True)),
        ({"voicemail_detection": True, "voicemail_action": "leave_message",
          "voicemail_message": "Call us"},
         VoicemailPolicy(True, VoicemailAction.LEAVE_MESSAGE, "Call us")),
    ],
)  # fmt: skip
def test_request_features_from_the_rows(
    template: dict[str, Any], expected: VoicemailPolicy | None
) -> None:
    features = {"max_duration_seconds": 90.2, "caller_id": "+15550001111", "record_calls": False}
    req = build_call_request(call_row(**template, **features))
    assert req.voicemail == expected
    assert (req.max_duration_seconds, req.caller_id, req.record) == (91, "+15550001111", False)
    bare = build_call_request(call_row(**template))
    assert (bare.max_duration_seconds, bare.caller_id, bare.record) == (None, None, None)
    assert "+15550001111" not in repr(req)


@given(
    interval=st.floats(min_value=0.1, max_value=3600),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_a_safety_net_delay_stretches_its_interval_by_at_most_a_quarter(
    interval: float, draw: float
) -> None:
    delay = safety_net_delay(interval, draw)
    assert interval <= delay < interval * 1.25 + 1e-9
    assert safety_net_delay(interval, 0.0) == interval
