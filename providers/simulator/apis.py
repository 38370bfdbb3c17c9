"""The Vapi and SynthFlow APIs of the simulator: routing, validation and error bodies.

Each API object answers ``route(method, parts, params, raw, headers)`` with ``(status, body,
extra headers)`` and knows its own error shapes; the server does auth, faults and latency.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from typing import Any, Protocol

from providers.simulator import shapes
from providers.simulator.engine import Engine, SimCall

Response = tuple[int, Any, dict[str, str] | None]


class Scheduler(Protocol):
    """Queues a call's webhooks (the simulator's ``WebhookSender``)."""

    def schedule(self, call: SimCall) -> None: ...


VAPI_LIST_DATES = tuple(
    f"{field}At{op}" for field in ("created", "updated") for op in ("Gt", "Lt", "Ge", "Le")
)
VAPI_LIST_PARAMS = frozenset(["id", "assistantId", "phoneNumberId", "limit", *VAPI_LIST_DATES])
VAPI_MAX_LIMIT = 1000


def parse_json(raw: bytes) -> Any:
    """The decoded body, or None when it is empty or not JSON."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


class VapiApi:
    """``/vapi``: ``POST/GET /call``, ``GET/PATCH/DELETE /call/{id}``, ``POST .../control``."""

    name = "vapi"
    prefix = "/vapi"

    def __init__(self, engine: Engine, webhooks: Scheduler) -> None:
        self.engine = engine
        self.webhooks = webhooks

    # -- error shapes ----------------------------------------------------------------------------

    def unauthorized(self) -> Response:
        message = "Invalid Key. Hot tip, you may be using the private key instead."
        return 401, shapes.vapi_error(401, message, "Unauthorized"), None

    def server_error(self) -> Response:
        return 500, shapes.vapi_error(500, "Internal server error", "Internal Server Error"), None

    def too_many(self, headers: dict[str, str]) -> Response:
        return 429, shapes.vapi_error(429, "Too Many Requests", "Too Many Requests"), headers

    def not_found(self, method: str, sub: str) -> Response:
        return 404, shapes.vapi_error(404, f"Cannot {method} {sub}", "Not Found"), None

    def is_create(self, method: str, sub: str) -> bool:
        return method == "POST" and sub == "/call"

    def is_call_read(self, method: str, parts: list[str]) -> bool:
        return method == "GET" and len(parts) == 2

    def open_path(self, sub: str) -> bool:
        """``monitor.controlUrl`` takes no key (as in Vapi's examples)."""
        return sub.endswith("/control")

    # -- routes ----------------------------------------------------------------------------------

    def route(
        self, method: str, parts: list[str], params: dict[str, str], raw: bytes, headers: Any
    ) -> Response | None:
        if not parts or parts[0] != "call":
            return None
        base = f"http://{headers.get('Host', '127.0.0.1')}{self.prefix}"
        rest = parts[1:]
        if not rest:
            if method == "POST":
                return self._create(raw, base, headers)
            return self._list(params, base) if method == "GET" else None
        if not _is_uuid(rest[0]):
            message = "Validation failed (uuid is expected)"
            return 400, shapes.vapi_error(400, message, "Bad Request"), None
        call = self.engine.get(rest[0])
        if call is None or call.provider != self.name:
            return 404, shapes.vapi_error(404, "Call not found", "Not Found"), None
        if len(rest) == 1 and method in ("GET", "PATCH", "DELETE"):
            now = time.time()
            if method == "PATCH":
                return self._update(call, raw, base)
            if method == "DELETE":
                return self._delete(call, base)
            return 200, shapes.vapi_call(call, now, base), None
        if method == "POST" and rest[1:] == ["control"]:
            return self._control(call, raw)
        return None

    def _create(self, raw: bytes, base: str, headers: Any) -> Response:
        body = parse_json(raw)
        errors = shapes.vapi_validate(body)
        if errors:
            return 400, shapes.vapi_error(400, errors, "Bad Request"), None
        if self.engine.at_capacity(self.name, time.time()):
            return self.too_many(retry_after(self.engine))
        correlation, queue = shapes.vapi_correlation(body)
        plan = body.get("schedulePlan") or {}
        start_at = shapes.parse_iso(plan.get("earliestAt")) if plan else None
        call = self.engine.create(
            self.name, correlation, queue, body["customer"]["number"], body,
            features=shapes.vapi_features(body), start_at=start_at,
        )  # fmt: skip
        self.webhooks.schedule(call)
        out = shapes.vapi_call(call, call.created, base, fresh=True)
        out["subscriptionLimits"] = {"concurrencyBlocked": False, "concurrencyLimit": 10}
        return 201, out, None

    def _list(self, params: dict[str, str], base: str) -> Response:
        errors, limit, bounds = vapi_list_query(params)
        if errors:
            return 400, shapes.vapi_error(400, errors, "Bad Request"), None
        now = time.time()
        created = {k: v for k, v in bounds.items() if k.startswith("created")}
        updated = {k: v for k, v in bounds.items() if k.startswith("updated")}
        rendered = (
            shapes.vapi_call(c, now, base)
            for c in self.engine.list(self.name)
            if all(_compare(c.created, k, v) for k, v in created.items())
        )
        equal = {k: params[k] for k in ("id", "assistantId", "phoneNumberId") if k in params}
        matches = (
            c
            for c in rendered
            if all(c.get(k) == v for k, v in equal.items())
            and all(_within(c, k, v) for k, v in updated.items())
        )
        return 200, list(itertools.islice(matches, limit)), None

    def _update(self, call: SimCall, raw: bytes, base: str) -> Response:
        body = parse_json(raw)
        if not isinstance(body, dict):
            return 400, shapes.vapi_error(400, ["body must be an object"], "Bad Request"), None
        errors = [f"property {k} should not exist" for k in body if k != "name"]
        name = body.get("name")
        if "name" in body and (not isinstance(name, str) or len(name) > shapes.VAPI_MAX_TEXT):
            errors.append("name must be shorter than or equal to 40 characters")
        if errors:
            return 400, shapes.vapi_error(400, errors, "Bad Request"), None
        if isinstance(name, str):
            self.engine.rename(call.id, name)
        return 200, shapes.vapi_call(call, time.time(), base), None

    def _delete(self, call: SimCall, base: str) -> Response:
        """Deletes the call's data; a call still scheduled is canceled first."""
        if call.phase(time.time()) == "scheduled":
            self.engine.cancel(call.id)
        body = shapes.vapi_call(call, time.time(), base)
        self.engine.delete(call.id)
        return 200, body, None

    def _control(self, call: SimCall, raw: bytes) -> Response:
        body = parse_json(raw)
        if not isinstance(body, dict) or body.get("type") != "end-call":
            return 400, shapes.vapi_error(400, ["type must be end-call"], "Bad Request"), None
        if self.engine.cancel(call.id) is not None:
            self.webhooks.schedule(call)
        return 200, {"success": True}, None


def retry_after(engine: Engine) -> dict[str, str]:
    """The ``Retry-After`` header of a 429."""
    return {"Retry-After": str(engine.config.get("retry_after_seconds", 1))}


def vapi_list_query(params: dict[str, str]) -> tuple[list[str], int, dict[str, float]]:
    """Validate ``GET /call``'s query as Vapi's ValidationPipe does: (errors, limit, bounds)."""
    errors = [f"property {k} should not exist" for k in params if k not in VAPI_LIST_PARAMS]
    limit = 100
    if "limit" in params:
        try:
            number = float(params["limit"])
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            errors.append("limit must be a number conforming to the specified constraints")
        elif number < 0:
            errors.append("limit must not be less than 0")
        elif number > VAPI_MAX_LIMIT:
            errors.append(f"limit must not be greater than {VAPI_MAX_LIMIT}")
        else:
            limit = int(number)
    bounds: dict[str, float] = {}
    for key in VAPI_LIST_DATES:
        if key in params:
            when = shapes.parse_iso(params[key])
            if when is None:
                errors.append(f"{key} must be a valid ISO 8601 date string")
            else:
                bounds[key] = when
    return errors, limit, bounds


def _within(call: dict[str, Any], key: str, bound: float) -> bool:
    """``updatedAtGt`` etc. against the rendered call."""
    value = shapes.parse_iso(call[key[: -len("Gt")]])
    return value is not None and _compare(value, key, bound)


def _compare(value: float, key: str, bound: float) -> bool:
    """One ``...Gt|Lt|Ge|Le`` bound (values are whole milliseconds; bounds may carry µs)."""
    a, b, op = round(value * 1_000_000), round(bound * 1_000_000), key[-2:]
    return {"Gt": a > b, "Lt": a < b, "Ge": a >= b, "Le": a <= b}[op]


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


class SynthflowApi:
    """``/synthflow/v2``: ``POST/GET /calls``, ``GET /calls/{id}``."""

    name = "synthflow"
    prefix = "/synthflow/v2"

    def __init__(self, engine: Engine, webhooks: Scheduler) -> None:
        self.engine = engine
        self.webhooks = webhooks

    def unauthorized(self) -> Response:
        return 401, _synthflow_detail("Unauthorized", "authentication"), None

    def server_error(self) -> Response:
        return 500, {"error": "internal_error", "message": "Internal server error"}, None

    def too_many(self, headers: dict[str, str]) -> Response:
        body = {"error": "rate_limit_exceeded", "message": "Concurrency limit reached"}
        return 429, body, headers

    def not_found(self, method: str, sub: str) -> Response:
        return 404, _synthflow_detail("Not Found", "not_found"), None

    def is_create(self, method: str, sub: str) -> bool:
        return method == "POST" and sub == "/calls"

    def is_call_read(self, method: str, parts: list[str]) -> bool:
        return method == "GET" and len(parts) == 2

    def open_path(self, sub: str) -> bool:
        return False

    def route(
        self, method: str, parts: list[str], params: dict[str, str], raw: bytes, headers: Any
    ) -> Response | None:
        if not parts or parts[0] != "calls":
            return None
        if method == "POST" and len(parts) == 1:
            return self._create(raw)
        if method == "GET" and len(parts) == 1:
            return self._list(params)
        if method != "GET" or len(parts) != 2:
            return None
        call = self.engine.get(parts[1])
        if call is None or call.provider != self.name:
            return 404, _synthflow_detail("Call not found", "not_found"), None
        item = shapes.synthflow_item(call, time.time(), listing=False, echo=self._echo())
        return 200, shapes.synthflow_page([item], 1, 0, 1), None

    def _echo(self) -> bool:
        return bool(self.engine.config.get("synthflow_echo_variables", True))

    def _list(self, params: dict[str, str]) -> Response:
        if not params.get("model_id"):
            return 400, _synthflow_detail("model_id is required", "validation"), None
        calls = [
            c
            for c in self.engine.list(self.name)
            if c.request.get("model_id") == params["model_id"]
        ]
        if params.get("lead_phone_number"):
            calls = [c for c in calls if c.number == params["lead_phone_number"]]
        if params.get("from_date"):
            since = int(params["from_date"]) / 1000.0
            calls = [c for c in calls if c.created >= since]
        limit, offset = int(params.get("limit", 20)), int(params.get("offset", 0))
        now, echo = time.time(), self._echo()
        page = [
            shapes.synthflow_item(c, now, listing=True, echo=echo)
            for c in calls[offset : offset + limit]
        ]
        return 200, shapes.synthflow_page(page, limit, offset, len(calls)), None

    def _create(self, raw: bytes) -> Response:
        body = parse_json(raw)
        errors = shapes.synthflow_validate(body)
        if errors:
            return 422, {"detail": errors}, None
        if self.engine.at_capacity(self.name, time.time()):
            return self.too_many(retry_after(self.engine))
        variables = shapes.synthflow_variables(body)
        call = self.engine.create(
            self.name, variables.get("callq_assignment_id"), variables.get("callq_queue_id"),
            body["phone"], body,
        )  # fmt: skip
        self.webhooks.schedule(call)
        answer = {"answer": "ok", "call_id": call.id}
        return 200, {"status": "success", "response": answer, "eta": 0}, None


def _synthflow_detail(description: str, category: str) -> dict[str, Any]:
    return {
        "detail": {
            "status": "error", "description": description, "request_id": "sim",
            "category": category,
        }
    }  # fmt: skip
