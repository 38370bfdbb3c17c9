"""Build the provider-neutral call request from the call a dispatch loaded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from models.calls import CallRow
from providers.base import CallRequest


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
    )


def _string_variables(raw: Mapping[str, Any]) -> dict[str, str]:
    """Providers take string values; nested JSON values are sent as JSON text."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out
