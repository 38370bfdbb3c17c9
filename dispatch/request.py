"""Build the provider-neutral call request from the call a dispatch loaded."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from models.calls import CallRow
from providers.base import CallRequest, VoicemailAction, VoicemailPolicy


def build_call_request(call: CallRow) -> CallRequest:
    """A :class:`CallRequest` for the loaded assignment, queue row and template."""
    variables = _string_variables(call.custom_variables)
    if call.recipient_name:
        variables.setdefault("recipient_name", call.recipient_name)
    return CallRequest(
        correlation_id=str(call.assignment_id),
        queue_id=str(call.queue_id),
        to_number=call.recipient_phone,
        recipient_name=call.recipient_name,
        recipient_email=call.recipient_email,
        script=call.script,
        first_message=call.first_message,
        variables=variables,
        template_name=call.template_name,
        max_duration_seconds=_positive_int(call.max_duration_seconds),
        caller_id=call.caller_id or None,
        voicemail=voicemail_policy(call),
        record=call.record_calls,
    )


def voicemail_policy(call: CallRow) -> VoicemailPolicy | None:
    """The template's voicemail policy; None leaves the provider's agent setting in place."""
    if call.voicemail_detection is None:
        return None
    message = call.voicemail_message
    if call.voicemail_action == VoicemailAction.LEAVE_MESSAGE and message:
        return VoicemailPolicy(call.voicemail_detection, VoicemailAction.LEAVE_MESSAGE, message)
    return VoicemailPolicy(call.voicemail_detection, VoicemailAction.HANG_UP)


def _positive_int(value: float | None) -> int | None:
    """A whole number of seconds (rounded up), or None when absent."""
    if value is None or isinstance(value, bool):
        return None
    return max(math.ceil(float(value)), 1)


def _string_variables(raw: Mapping[str, Any]) -> dict[str, str]:
    """Providers take string values; nested JSON values are sent as JSON text."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out
