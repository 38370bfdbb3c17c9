"""Retell AI in the simulator, under ``/retell`` (the shapes of the ``retell-sdk`` types).

``POST /v2/create-phone-call`` (201), ``GET /v2/get-call/{id}``, ``POST /v3/list-calls``,
``PATCH /v2/update-call/{id}``, ``POST /v2/stop-call/{id}`` (204), ``DELETE
/v2/delete-call/{id}`` (204), ``GET /get-concurrency``. Errors are ``{"status": "error",
"message": ...}``. Webhooks (``call_started``, ``call_ended``, ``call_analyzed``) are signed
``x-retell-signature: v=<ms>,d=<hex HMAC-SHA256(api key, body + ms)>`` with the creating key.
Stricter than documented on purpose: unknown request fields are refused (400).
"""

from __future__ import annotations

import base64
import time
from typing import Any

from providers.simulator import shapes
from providers.simulator.apis import Response, Scheduler, parse_json, retry_after
from providers.simulator.engine import Engine, Features, SimCall

# Field names of the retell-sdk request types (a contract test compares them with the SDK).
CREATE_FIELDS = frozenset(
    ["agent_override", "custom_sip_headers", "from_number", "honor_internal_dnc",
     "idempotency_key", "ignore_e164_validation", "metadata", "override_agent_id",
     "override_agent_version", "retell_llm_dynamic_variables", "to_number"]
)  # fmt: skip
OVERRIDE_FIELDS = frozenset(["agent", "conversation_flow", "retell_llm"])
AGENT_FIELDS = frozenset(
    ["agent_name", "allow_dtmf_interruption", "allow_user_dtmf", "ambient_sound",
     "ambient_sound_volume", "backchannel_frequency", "backchannel_words",
     "begin_message_delay_ms", "boosted_keywords", "call_screening_option",
     "contact_memory_config", "custom_stt_config", "data_storage_retention_days",
     "data_storage_setting", "denoising_enhancement_level", "denoising_mode",
     "enable_backchannel", "enable_dnc_detection", "enable_dynamic_responsiveness",
     "enable_dynamic_voice_speed", "enable_expressive_mode", "end_call_after_silence_ms",
     "expressive_emotion_tags", "expressive_mode_prompt", "fallback_voice_ids",
     "guardrail_config", "handbook_config", "interruption_sensitivity", "ivr_option",
     "language", "max_call_duration_ms", "opt_in_signed_url", "pii_config",
     "post_call_analysis_data", "post_call_analysis_model", "post_session_tools",
     "pre_session_tools", "pronunciation_dictionary", "reminder_max_count",
     "reminder_trigger_ms", "response_engine", "responsiveness", "ring_duration_ms",
     "signed_url_expiration_ms", "stt_mode", "timezone", "user_dtmf_options",
     "version_description", "version_title", "vocab_specialization", "voice_id",
     "voice_model", "voice_speed", "voice_temperature", "voicemail_option", "volume",
     "webhook_events", "webhook_timeout_ms", "webhook_url"]
)  # fmt: skip
RETELL_LLM_FIELDS = frozenset(
    ["backup_model", "begin_after_user_silence_ms", "begin_message", "kb_config",
     "knowledge_base_ids", "model", "model_config", "model_high_priority", "model_temperature",
     "model_ultrafast", "s2s_model", "start_speaker", "tool_call_strict_mode"]
)  # fmt: skip
LIST_FIELDS = frozenset(
    ["filter_criteria", "include_total", "limit", "pagination_key", "skip", "sort_order"]
)
UPDATE_FIELDS = frozenset(["custom_attributes", "data_storage_setting", "metadata"])
STORAGE_SETTINGS = ("everything", "everything_except_pii", "basic_attributes_only")
VOICEMAIL_ACTIONS = ("prompt", "static_text", "hangup", "bridge_transfer")
MIN_CALL_MS, MAX_CALL_MS = 60_000, 7_200_000
IDEMPOTENCY_SECONDS = 3600.0

# outcome -> (call_status, disconnection_reason)
ENDINGS = {
    "completed": ("ended", "user_hangup"),
    "busy": ("not_connected", "dial_busy"),
    "no_answer": ("not_connected", "dial_no_answer"),
    "voicemail": ("ended", "voicemail_reached"),
    "failed": ("not_connected", "dial_failed"),
    "failed_permanent": ("not_connected", "invalid_destination"),
    "failed_after_answer": ("error", "error_llm_websocket_lost_connection"),
    "canceled": ("ended", "manual_stopped"),
}
LIVE = {"queued": "registered", "ringing": "registered", "in-progress": "ongoing"}


def error(status: int, message: str) -> Response:
    """Retell's error body."""
    return status, {"status": "error", "message": message}, None


def validate_create(body: object) -> str | None:
    """The first problem with a create body, or None."""
    if not isinstance(body, dict):
        return "Invalid request format, please check API reference."
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        return f"Unknown field: {unknown[0]}"
    for key in ("from_number", "to_number"):
        value = body.get(key)
        if not isinstance(value, str) or not value:
            return f"{key} is required"
        skip = key == "from_number" and body.get("ignore_e164_validation") is True
        if not skip and not shapes.E164.match(value):
            return f"{key} is not a valid E.164 number"
    variables = body.get("retell_llm_dynamic_variables", {})
    if not isinstance(variables, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in variables.items()
    ):
        return "retell_llm_dynamic_variables must map strings to strings"
    if "metadata" in body and not isinstance(body["metadata"], dict):
        return "metadata must be an object"
    return _validate_override(body.get("agent_override"))


def _validate_override(override: object) -> str | None:
    if override is None:
        return None
    if not isinstance(override, dict) or set(override) - OVERRIDE_FIELDS:
        return "agent_override has unknown fields"
    agent = override.get("agent", {})
    llm = override.get("retell_llm", {})
    if not isinstance(agent, dict) or set(agent) - AGENT_FIELDS:
        return "agent_override.agent has unknown fields"
    if not isinstance(llm, dict) or set(llm) - RETELL_LLM_FIELDS:
        return "agent_override.retell_llm has unknown fields"
    limit = agent.get("max_call_duration_ms", MIN_CALL_MS)
    if not isinstance(limit, int) or not MIN_CALL_MS <= limit <= MAX_CALL_MS:
        return f"max_call_duration_ms must be between {MIN_CALL_MS} and {MAX_CALL_MS}"
    if agent.get("data_storage_setting", "everything") not in STORAGE_SETTINGS:
        return "data_storage_setting is invalid"
    option = agent.get("voicemail_option")
    if option is not None:
        action = option.get("action") if isinstance(option, dict) else None
        kind = action.get("type") if isinstance(action, dict) else None
        if kind not in VOICEMAIL_ACTIONS:
            return "voicemail_option.action.type is invalid"
        if kind in ("prompt", "static_text") and not (action or {}).get("text"):
            return "voicemail_option.action.text is required"
    return None


def features(body: dict[str, Any]) -> Features:
    """The call features a create body asks for (absent: the agent's own settings, here on)."""
    agent = (body.get("agent_override") or {}).get("agent") or {}
    option = agent.get("voicemail_option", {"action": {"type": "hangup"}})
    kind = ((option or {}).get("action") or {}).get("type")
    limit = agent.get("max_call_duration_ms")
    return Features(
        max_seconds=limit / 1000.0 if limit is not None else None,
        voicemail_detect=option is not None,
        leave_message=kind in ("prompt", "static_text"),
        record=agent.get("data_storage_setting") != "basic_attributes_only",
    )


def ms(ts: float) -> int:
    """Epoch milliseconds."""
    return round(ts * 1000)


def status_of(call: SimCall, now: float) -> tuple[str, str | None]:
    """(call_status, disconnection_reason) as of ``now``."""
    phase = call.phase(now)
    if phase != "ended":
        return LIVE.get(phase, "registered"), None
    status, reason = ENDINGS.get(call.final_outcome, ("ended", "user_hangup"))
    if call.hit_max_duration and not call.canceled:
        reason = "max_duration_reached"
    return status, reason


def phone_call(
    call: SimCall, now: float, *, listing: bool = False, analyzed: bool = True
) -> dict[str, Any]:
    """A ``PhoneCallResponse`` (``listing``: an ``ItemV3PhoneCallResponse``, no transcript)."""
    req = call.request
    status, reason = status_of(call, now)
    agent = (req.get("agent_override") or {}).get("agent") or {}
    out: dict[str, Any] = {
        "call_id": call.id, "call_type": "phone_call", "direction": "outbound",
        "agent_id": req.get("override_agent_id") or "agent_sim", "agent_version": 1,
        "call_status": status, "from_number": req["from_number"], "to_number": call.number,
        "metadata": req.get("metadata") or {},
        "retell_llm_dynamic_variables": req.get("retell_llm_dynamic_variables") or {},
        "data_storage_setting": agent.get("data_storage_setting", "everything"),
        "telephony_identifier": {"twilio_call_sid": "CA" + call.id.replace("-", "")},
    }  # fmt: skip
    answered = call.answer_at is not None and call.answer_at <= min(now, call.end_at)
    if answered:
        assert call.answer_at is not None
        out["start_timestamp"] = ms(call.answer_at)
    if status in ("ended", "not_connected", "error"):
        out["disconnection_reason"] = reason
        out["end_timestamp"] = ms(call.end_at)
        out.update(_ending(call, answered, listing=listing, analyzed=analyzed))
    return out


def _ending(call: SimCall, answered: bool, *, listing: bool, analyzed: bool) -> dict[str, Any]:
    assert not answered or call.answer_at is not None
    seconds = call.end_at - call.answer_at if answered and call.answer_at else 0.0
    out: dict[str, Any] = {
        "duration_ms": ms(seconds),
        "call_cost": {
            "combined_cost": round(seconds * 0.12, 4), "product_costs": [],
            "total_duration_seconds": round(seconds, 3), "total_duration_unit_price": 0.12,
        },
    }  # fmt: skip
    if answered and call.features.record:
        out["recording_url"] = f"https://storage.sim.invalid/{call.id}.wav"
    if answered and not listing:
        out["transcript"] = shapes.TRANSCRIPT
    if analyzed:
        out["call_analysis"] = {
            "in_voicemail": call.final_outcome == "voicemail",
            "call_successful": call.final_outcome == "completed",
            "call_summary": "A simulated call.", "user_sentiment": "Neutral",
        }  # fmt: skip
    return out


class RetellApi:
    """``/retell``: the Retell call endpoints the adapter and the SDK tests use."""

    name = "retell"
    prefix = "/retell"

    def __init__(self, engine: Engine, webhooks: Scheduler) -> None:
        self.engine = engine
        self.webhooks = webhooks

    def unauthorized(self) -> Response:
        return error(401, "API key is missing or invalid.")

    def server_error(self) -> Response:
        return error(500, "Internal server error")

    def too_many(self, headers: dict[str, str]) -> Response:
        status, body, _ = error(429, "Concurrency limit reached")
        return status, body, headers

    def not_found(self, method: str, sub: str) -> Response:
        return error(404, "Not Found")

    def is_create(self, method: str, sub: str) -> bool:
        return method == "POST" and sub == "/v2/create-phone-call"

    def is_call_read(self, method: str, parts: list[str]) -> bool:
        return method == "GET" and parts[:2] == ["v2", "get-call"]

    def open_path(self, sub: str) -> bool:
        return False

    def route(
        self, method: str, parts: list[str], params: dict[str, str], raw: bytes, headers: Any
    ) -> Response | None:
        key = headers.get("Authorization", "")[7:].strip()
        if method == "POST" and parts == ["v2", "create-phone-call"]:
            return self._create(raw, key)
        if method == "POST" and parts == ["v3", "list-calls"]:
            return self._list(raw)
        if method == "GET" and parts == ["get-concurrency"]:
            return 200, {"current_concurrency": self.engine.stats()["active"],
                         "concurrency_limit": 20, "base_concurrency": 20}, None  # fmt: skip
        if len(parts) != 3 or parts[0] != "v2":
            return None
        call = self.engine.get(parts[2])
        if call is None or call.provider != self.name:
            return error(404, "Call not found")
        verb = (method, parts[1])
        if verb == ("GET", "get-call"):
            return 200, phone_call(call, time.time()), None
        if verb == ("PATCH", "update-call"):
            return self._update(call, raw)
        if verb == ("POST", "stop-call"):
            return self._stop(call)
        if verb == ("DELETE", "delete-call"):
            self.engine.delete(call.id)
            return 204, None, None
        return None

    def _create(self, raw: bytes, key: str) -> Response:
        body = parse_json(raw)
        problem = validate_create(body)
        if problem:
            return error(400, problem)
        assert isinstance(body, dict)
        earlier = self._same_key(body.get("idempotency_key"))
        if earlier is not None:
            return 201, phone_call(earlier, time.time()), None
        if self.engine.at_capacity(self.name, time.time()):
            return self.too_many(retry_after(self.engine))
        meta = body.get("metadata") or {}
        call = self.engine.create(
            self.name, meta.get("callq_assignment_id"), meta.get("callq_queue_id"),
            body["to_number"], body, features=features(body), account_key=key,
            idempotency_key=body.get("idempotency_key"),
        )  # fmt: skip
        self.webhooks.schedule(call)
        return 201, phone_call(call, call.created), None

    def _same_key(self, key: object) -> SimCall | None:
        """The call an earlier create with this idempotency key made, within the hour."""
        if not isinstance(key, str) or not key:
            return None
        call = self.engine.by_idempotency_key(self.name, key)
        if call is None or time.time() - call.created > IDEMPOTENCY_SECONDS:
            return None
        return call

    def _list(self, raw: bytes) -> Response:
        body = parse_json(raw) if raw else {}
        if not isinstance(body, dict) or set(body) - LIST_FIELDS:
            return error(400, "Invalid request format, please check API reference.")
        criteria = body.get("filter_criteria") or {}
        limit, after = int(body.get("limit", 50)), _cursor(body.get("pagination_key"))
        if not 1 <= limit <= 1000 or not isinstance(criteria, dict) or after is False:
            return error(400, "Invalid request format, please check API reference.")
        now = time.time()
        # A page continues after the last call of the previous one (the key names it), in an
        # order that does not change while calls start and end, so paging never repeats or
        # skips a call.
        descending = body.get("sort_order", "descending") == "descending"
        calls = sorted(self.engine.list(self.name), key=_order, reverse=descending)
        listed = ((c, phone_call(c, now, listing=True)) for c in calls)
        everything = [(c, i) for c, i in listed if matches(i, criteria)]
        matched = [
            (c, i)
            for c, i in everything
            if not isinstance(after, tuple)
            or (_order(c) < after if descending else _order(c) > after)
        ][int(body.get("skip", 0)) :]
        page = matched[:limit]
        more = len(matched) > limit
        out: dict[str, Any] = {"items": [i for _, i in page], "has_more": more}
        if more:
            created, call_id = _order(page[-1][0])
            out["pagination_key"] = base64.urlsafe_b64encode(
                f"{created!r}|{call_id}".encode()
            ).decode()
        if body.get("include_total"):
            out["total"] = len(everything)
        return 200, out, None

    def _update(self, call: SimCall, raw: bytes) -> Response:
        body = parse_json(raw)
        if not isinstance(body, dict) or set(body) - UPDATE_FIELDS:
            return error(400, "Invalid request format, please check API reference.")
        if "metadata" in body:
            call.request["metadata"] = body["metadata"]
        return 200, phone_call(call, time.time()), None

    def _stop(self, call: SimCall) -> Response:
        if self.engine.cancel(call.id) is None:
            return error(400, "Call is not ongoing")
        self.webhooks.schedule(call)
        return 204, None, None


def _order(call: SimCall) -> tuple[float, str]:
    """A listed call's place: when it was created, then its id (never changes)."""
    return (call.created, call.id)


def _cursor(key: object) -> tuple[float, str] | bool | None:
    """The place a ``pagination_key`` continues after; None for the first page, False if bad."""
    if key is None:
        return None
    try:
        created, call_id = base64.urlsafe_b64decode(str(key).encode()).decode().split("|", 1)
        return (float(created), call_id)
    except ValueError:
        return False


def matches(item: dict[str, Any], criteria: dict[str, Any]) -> bool:
    """``filter_criteria`` (AND of every key) against one listed call."""
    for key, spec in criteria.items():
        if key in ("metadata", "dynamic_variables"):
            holder = item.get("metadata" if key == "metadata" else "retell_llm_dynamic_variables")
            if not all(_test((holder or {}).get(f.get("key")), f) for f in spec):
                return False
        elif key == "agent":
            if not any(item["agent_id"] == a.get("agent_id") for a in spec):
                return False
        elif not _test(item.get(key), spec):
            return False
    return True


def _test(value: object, spec: dict[str, Any]) -> bool:
    """One typed filter: string, number, range, enum, boolean or present."""
    op, want, kind = str(spec.get("op")), spec.get("value"), spec.get("type")
    if kind == "enum":
        return value in (want or [])
    if kind == "present":
        return value is not None
    if kind == "range":
        lo, hi = want or (0, 0)
        return isinstance(value, int | float) and float(lo) <= value <= float(hi)
    if op in ("eq", "ne"):
        return (value == want) is (op == "eq")
    if isinstance(value, str) and isinstance(want, str) and op in ("sw", "ew", "co"):
        return {"sw": value.startswith, "ew": value.endswith, "co": value.__contains__}[op](want)
    if isinstance(value, int | float) and isinstance(want, int | float):
        return {"gt": value > want, "ge": value >= want, "lt": value < want,
                "le": value <= want}.get(op, False)  # fmt: skip
    return False
