"""Request validation and response bodies in each provider's real shapes."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from providers.simulator.engine import Features, SimCall

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
ISO_DATE = re.compile(
    r"^\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:?\d{2})?)?$"
)
VAPI_MAX_TEXT = 40

# Property names from the Vapi OpenAPI spec (CreateCallDTO and the objects nested in it).
VAPI_CREATE_FIELDS = frozenset(
    [
        "assistant",
        "assistantId",
        "assistantOverrides",
        "assistantVersion",
        "customer",
        "customerId",
        "customers",
        "name",
        "phoneNumber",
        "phoneNumberId",
        "schedulePlan",
        "squad",
        "squadId",
        "squadOverrides",
        "transport",
        "workflow",
        "workflowId",
        "workflowOverrides",
    ]
)
VAPI_CUSTOMER_FIELDS = frozenset(
    [
        "assistantOverrides",
        "email",
        "extension",
        "externalId",
        "name",
        "number",
        "numberE164CheckEnabled",
        "sipUri",
        "squadOverrides",
    ]
)
_ASSISTANT_COMMON = [
    "analysisPlan",
    "artifactPlan",
    "backgroundSound",
    "backgroundSpeechDenoisingPlan",
    "clientMessages",
    "compliancePlan",
    "credentialIds",
    "credentials",
    "endCallMessage",
    "endCallPhrases",
    "firstMessage",
    "firstMessageInterruptionsEnabled",
    "firstMessageMode",
    "hooks",
    "keypadInputPlan",
    "maxDurationSeconds",
    "metadata",
    "model",
    "modelOutputInMessagesEnabled",
    "monitorPlan",
    "name",
    "observabilityPlan",
    "server",
    "serverMessages",
    "startSpeakingPlan",
    "stopSpeakingPlan",
    "transcriber",
    "transportConfigurations",
    "voice",
    "voicemailDetection",
    "voicemailMessage",
]
VAPI_ASSISTANT_FIELDS = frozenset(_ASSISTANT_COMMON)
VAPI_OVERRIDES_FIELDS = frozenset([*_ASSISTANT_COMMON, "tools:append", "variableValues"])

VAPI_REASONS = {
    "completed": "customer-ended-call",
    "busy": "customer-busy",
    "no_answer": "customer-did-not-answer",
    "voicemail": "voicemail",
    "failed": "twilio-failed-to-connect-call",
    "failed_permanent": "twilio-reported-customer-misdialed",
    "failed_after_answer": "phone-call-provider-closed-websocket",
    "canceled": "manually-canceled",
}
# outcome -> (status, end_call_reason, error_message)
SYNTHFLOW_ENDINGS = {
    "completed": ("completed", "human_ended_call", ""),
    "busy": ("busy", None, ""),
    "no_answer": ("no-answer", None, ""),
    "voicemail": ("hangup_on_voicemail", "voicemail", ""),
    "failed": ("failed", None, "487: Request Terminated"),
    "failed_permanent": ("failed", None, "Telephony - 400 - Invalid phone number"),
    "failed_after_answer": ("completed", "error", ""),
    "canceled": ("canceled", None, ""),
}
SYNTHFLOW_LIVE = {"queued": "pending", "ringing": "ringing", "in-progress": "in-progress"}
TRANSCRIPT = "AI: Hello, this is a simulated call.\nUser: Hi.\nAI: Goodbye."


def parse_iso(text: object) -> float | None:
    """Epoch seconds from ISO 8601 date-time text (``Z`` or an offset), or None if malformed."""
    if not isinstance(text, str) or not ISO_DATE.match(text):
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def iso(ts: float) -> str:
    """Epoch seconds as Vapi's ISO 8601 text."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- Vapi ---------------------------------------------------------------------------------------


def vapi_validate(body: object) -> list[str]:
    """class-validator style messages for a ``POST /call`` body (empty when valid)."""
    if not isinstance(body, dict):
        return ["body must be an object"]
    errors = [f"property {k} should not exist" for k in body if k not in VAPI_CREATE_FIELDS]
    for name, allowed in (
        ("customer", VAPI_CUSTOMER_FIELDS),
        ("assistantOverrides", VAPI_OVERRIDES_FIELDS),
        ("assistant", VAPI_ASSISTANT_FIELDS),
    ):
        part = body.get(name)
        if part is not None and not isinstance(part, dict):
            errors.append(f"{name} must be an object")
        elif isinstance(part, dict):
            errors += [f"{name}.property {k} should not exist" for k in part if k not in allowed]
    customer = body.get("customer") if isinstance(body.get("customer"), dict) else None
    if customer is None:
        errors.append("customer must be an object")
    else:
        number = customer.get("number")
        if not isinstance(number, str) or not 3 <= len(number) <= 40:
            errors.append("customer.number must be longer than or equal to 3 characters")
        elif customer.get("numberE164CheckEnabled", True) and not E164.match(number):
            errors.append("customer.number must be a valid phone number in the E.164 format.")
        for key in ("name", "email", "externalId"):
            if isinstance(customer.get(key), str) and len(customer[key]) > 40:
                errors.append(f"customer.{key} must be shorter than or equal to 40 characters")
    if isinstance(body.get("name"), str) and len(body["name"]) > 40:
        errors.append("name must be shorter than or equal to 40 characters")
    if not body.get("phoneNumberId") and not body.get("phoneNumber"):
        errors.append("phoneNumberId or phoneNumber must be provided")
    if not any(body.get(k) for k in ("assistantId", "assistant", "squadId", "squad", "workflowId")):
        errors.append("assistantId or assistant must be provided")
    return errors


def vapi_error(status: int, message: str | list[str], error: str) -> dict[str, Any]:
    """Vapi's NestJS error body."""
    return {"message": message, "error": error, "statusCode": status}


def vapi_correlation(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(assignment id, queue id) from a create body."""
    meta: dict[str, Any] = {}
    for holder in (body.get("assistantOverrides"), body.get("assistant")):
        if isinstance(holder, dict) and isinstance(holder.get("metadata"), dict):
            meta = {**holder["metadata"], **meta}
    customer = body.get("customer") or {}
    return (
        meta.get("callq_assignment_id") or customer.get("externalId"),
        meta.get("callq_queue_id"),
    )


def vapi_call(
    call: SimCall, now: float, control_base: str, *, fresh: bool = False
) -> dict[str, Any]:
    """A Vapi ``Call`` object as of ``now`` (``fresh``: as the create response shows it)."""
    req = call.request
    phase = call.phase(call.created if fresh else now)
    if fresh and phase != "scheduled":
        phase = "queued"
    changed = max(
        t
        for t in (call.created, call.ring_at, call.answer_at or 0, call.end_at, call.updated or 0)
        if t <= max(now, call.created)
    )
    out: dict[str, Any] = {
        "id": call.id,
        "orgId": "sim-org",
        "type": "outboundPhoneCall",
        "createdAt": iso(call.created),
        "updatedAt": iso(call.created if fresh else changed),
        "status": phase,
        "phoneCallProvider": "twilio",
        "phoneCallTransport": "pstn",
        "phoneNumberId": req.get("phoneNumberId"),
        "customer": req.get("customer"),
        "monitor": {
            "listenUrl": f"ws://sim/{call.id}/listen",
            "controlUrl": f"{control_base}/call/{call.id}/control",
        },
    }
    for key in ("assistantId", "assistant", "assistantOverrides", "name", "schedulePlan"):
        if key in req:
            out[key] = req[key]
    if phase == "ended":
        out.update(_vapi_ending(call))
    elif phase == "in-progress" and call.answer_at is not None:
        out["startedAt"] = iso(call.answer_at)
    return out


def vapi_ended_reason(call: SimCall) -> str:
    """The ``endedReason`` of an ended call."""
    if call.canceled and call.scheduled_until is not None and call.end_at < call.scheduled_until:
        return "scheduled-call-deleted"
    if call.hit_max_duration and not call.canceled:
        return "exceeded-max-duration"
    return VAPI_REASONS.get(call.final_outcome, "customer-ended-call")


def _vapi_ending(call: SimCall) -> dict[str, Any]:
    out: dict[str, Any] = {"endedReason": vapi_ended_reason(call), "endedAt": iso(call.end_at)}
    answered = call.answer_at is not None and call.answer_at <= call.end_at
    if answered:
        assert call.answer_at is not None
        out["startedAt"] = iso(call.answer_at)
        seconds = call.end_at - call.answer_at
        out["cost"] = round(0.0015 * seconds + 0.01, 4)
        out["costBreakdown"] = {"total": out["cost"]}
        out["artifact"] = {"transcript": TRANSCRIPT, "messages": []}
        if call.features.record:
            out["artifact"]["recordingUrl"] = f"https://storage.sim.invalid/{call.id}-mono.wav"
    else:
        out["cost"] = 0
    return out


def vapi_features(body: dict[str, Any]) -> Features:
    """The call features a create body asks for (overrides win over the inline assistant)."""
    merged: dict[str, Any] = {}
    for holder in (body.get("assistant"), body.get("assistantOverrides")):
        if isinstance(holder, dict):
            merged.update(holder)
    detection = merged.get("voicemailDetection")
    raw_plan = merged.get("artifactPlan")
    plan: dict[str, Any] = raw_plan if isinstance(raw_plan, dict) else {}
    max_seconds = merged.get("maxDurationSeconds")
    return Features(
        max_seconds=float(max_seconds) if max_seconds is not None else None,
        voicemail_detect=detection != "off",  # absent: the saved agent's setting (on, here)
        leave_message=bool(merged.get("voicemailMessage")),
        record=plan.get("recordingEnabled", True) is not False,
    )


# --- SynthFlow ----------------------------------------------------------------------------------


def synthflow_validate(body: object) -> list[dict[str, Any]]:
    """FastAPI-style 422 details for a ``POST /calls`` body (empty when valid)."""
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
    errors = [
        {"loc": ["body", k], "msg": "field required", "type": "value_error.missing"}
        for k in ("model_id", "phone", "name")
        if not isinstance(body.get(k), str) or (k != "name" and not body.get(k))
    ]
    variables = body.get("custom_variables", [])
    if not isinstance(variables, list) or not all(
        isinstance(v, dict) and isinstance(v.get("key"), str) and isinstance(v.get("value"), str)
        for v in variables
    ):
        errors.append(
            {"loc": ["body", "custom_variables"], "msg": "must be a list of {key, value} strings",
             "type": "type_error.list"}
        )  # fmt: skip
    return errors


def synthflow_variables(body: dict[str, Any]) -> dict[str, str]:
    """The custom variables of a create body as a dict."""
    return {v["key"]: v["value"] for v in body.get("custom_variables") or []}


def synthflow_item(call: SimCall, now: float, *, listing: bool, echo: bool) -> dict[str, Any]:
    """A get-call item (``status``) or list item (``call_status``) as of ``now``."""
    req = call.request
    phase = call.phase(now)
    if phase == "ended":
        status, reason, error = SYNTHFLOW_ENDINGS.get(call.final_outcome, ("completed", None, ""))
    else:
        status, reason, error = SYNTHFLOW_LIVE[phase], None, ""
    answered_at = call.answer_at if call.answer_at is not None and call.answer_at <= now else None
    duration = 0
    if answered_at is not None:
        duration = round(min(now, call.end_at) - answered_at)
    item: dict[str, Any] = {
        "call_id": call.id,
        "model_id": req.get("model_id"),
        "name": req.get("name"),
        "transcript": TRANSCRIPT if answered_at is not None and phase == "ended" else "",
        "duration": duration,
        "recording_url": f"https://storage.sim.invalid/{call.id}.mp3" if answered_at else None,
        "end_call_reason": reason,
        "error_message": error,
        "type_of_call": "outbound",
        "start_time": str(int((answered_at or call.ring_at) * 1000)),
        "timezone": "UTC",
        "campaign_type": "outbound",
        "phone_number_from": req.get("from_phone_number", "+15550000000"),
        "phone_number_to": call.number,
    }
    if echo:
        item["prompt_variables"] = synthflow_variables(req)
    if listing:
        item["call_status"] = status
        item["lead_phone_number"] = call.number
        item["lead_name"] = req.get("name")
    else:
        item["status"] = status
    return item


def synthflow_page(
    items: list[dict[str, Any]], limit: int, offset: int, total: int
) -> dict[str, Any]:
    """The ``{status, response: {pagination, calls}}`` wrapper."""
    return {
        "status": "ok",
        "response": {
            "pagination": {"total_records": total, "limit": limit, "offset": offset},
            "calls": items,
        },
    }


def synthflow_webhook(call: SimCall, now: float) -> dict[str, Any]:
    """The post-call webhook body (``start_time`` in ISO 8601 here, unlike the API)."""
    item = synthflow_item(call, now, listing=False, echo=False)
    item["start_time"] = iso(int(item["start_time"]) / 1000)
    item["external_id"] = call.correlation_id
    return {
        "status": item["status"],
        "error_message": item["error_message"],
        "lead": {"name": item["name"], "phone_number": call.number},
        "call": item,
        "executed_actions": {},
    }
