"""Build the provider-neutral call request from the rows a dispatch loads."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from providers.base import CallRequest, VoicemailAction, VoicemailPolicy


def build_call_request(call: Mapping[str, Any]) -> CallRequest:
    """A :class:`CallRequest` for the loaded assignment/queue/template row."""
    variables = _string_variables(call.get("custom_variables") or {})
    if call.get("recipient_name"):
        variables.setdefault("recipient_name", str(call["recipient_name"]))
    return CallRequest(
        correlation_id=str(call["assignment_id"]),
        queue_id=str(call["queue_id"]),
        to_number=str(call["recipient_phone"]),
        recipient_name=call.get("recipient_name"),
        recipient_email=call.get("recipient_email"),
        script=call.get("script"),
        first_message=call.get("first_message"),
        variables=variables,
        template_name=call.get("template_name"),
        max_duration_seconds=_positive_int(call.get("max_duration_seconds")),
        caller_id=call.get("caller_id") or None,
        voicemail=voicemail_policy(call),
        record=call.get("record_calls"),
    )


def voicemail_policy(template: Mapping[str, Any]) -> VoicemailPolicy | None:
    """The template's voicemail policy; None leaves the provider's agent setting in place."""
    detect = template.get("voicemail_detection")
    if detect is None:
        return None
    message = template.get("voicemail_message")
    if template.get("voicemail_action") == VoicemailAction.LEAVE_MESSAGE and message:
        return VoicemailPolicy(bool(detect), VoicemailAction.LEAVE_MESSAGE, str(message))
    return VoicemailPolicy(bool(detect), VoicemailAction.HANG_UP)


def _positive_int(value: object) -> int | None:
    """A whole number of seconds (rounded up), or None when absent."""
    if value is None or isinstance(value, bool):
        return None
    seconds = math.ceil(float(value))  # type: ignore[arg-type]
    return max(seconds, 1)


def _string_variables(raw: Mapping[str, Any]) -> dict[str, str]:
    """Providers take string values; nested JSON values are sent as JSON text."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out
