"""The simulator's HTTP server: Vapi under ``/vapi``, SynthFlow under ``/synthflow/v2``.

``Simulator(config).start(port=0)`` runs it in a thread (tests); ``python -m providers.simulator``
runs it in the foreground. Control API: ``GET /_sim/stats[?times=1]``, ``GET|POST /_sim/config``,
``POST /_sim/reset``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from providers.simulator import shapes
from providers.simulator.engine import Engine, SimCall
from providers.simulator.webhooks import WebhookSender

DEFAULT_API_KEYS = "sim-vapi-key,sim-synthflow-key"
VAPI = "/vapi"
SYNTHFLOW = "/synthflow/v2"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    sim: Simulator


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: paths carry ids and the benchmark needs the CPU."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            status, body, headers = self.server.sim.handle(
                method, url.path, url.query, self.headers, raw
            )
        except _Drop:
            self.close_connection = True
            return
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class _Drop(Exception):
    """Close the connection without answering (an outage in ``refuse`` mode)."""


Response = tuple[int, Any, dict[str, str] | None]


class Simulator:
    """A local fake of the Vapi and SynthFlow APIs (see the package docstring for config)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.engine = Engine(config)
        keys = (
            self.engine.config.get("api_keys") or os.environ.get("SIM_API_KEYS") or DEFAULT_API_KEYS
        )
        self.api_keys = frozenset(
            k.strip() for k in (keys.split(",") if isinstance(keys, str) else keys)
        )
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._webhooks = WebhookSender(self.engine)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, port: int = 0, host: str = "127.0.0.1") -> Simulator:
        """Serve in a daemon thread; ``port=0`` picks a free port (see :attr:`base_url`)."""
        self._server = _Server((host, port), _Handler)
        self._server.sim = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="sim", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve in the calling thread until interrupted."""
        self._server = _Server((host, port), _Handler)
        self._server.sim = self
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()
            self._webhooks.stop()

    def stop(self) -> None:
        """Stop serving and the webhook thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._webhooks.stop()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None, "simulator not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``; Vapi is at ``base_url + "/vapi"``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def vapi_url(self) -> str:
        """The ``base_url`` to configure on a Vapi provider row."""
        return self.base_url + VAPI

    @property
    def synthflow_url(self) -> str:
        """The ``base_url`` to configure on a SynthFlow provider row."""
        return self.base_url + SYNTHFLOW

    # -- in-process control (same as the /_sim API) ----------------------------------------------

    def configure(self, update: dict[str, Any]) -> dict[str, Any]:
        """Merge config (``POST /_sim/config``)."""
        return self.engine.configure(update)

    def reset(self) -> None:
        """Forget calls and counters (``POST /_sim/reset``)."""
        self.engine.reset()

    def stats(self, times: bool = False) -> dict[str, Any]:
        """Counters (``GET /_sim/stats``)."""
        return self.engine.stats(times=times)

    # -- routing ---------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, headers: Any, raw: bytes) -> Response:
        """Answer one request: ``(status, json body, extra headers)``."""
        if path.startswith("/_sim/"):
            return self._control(method, path, query, raw)
        if path.startswith(VAPI + "/"):
            provider, sub = "vapi", path[len(VAPI) :]
        elif path.startswith(SYNTHFLOW + "/"):
            provider, sub = "synthflow", path[len(SYNTHFLOW) :]
        else:
            return 404, {"message": "Not Found", "statusCode": 404}, None
        control = provider == "vapi" and sub.endswith("/control")
        if not control and not self._authorized(headers.get("Authorization", "")):
            return self._unauthorized(provider)
        latency = float(self.engine.config.get("latency_ms") or 0)
        if latency:
            time.sleep(latency / 1000.0)
        fault = self.engine.fault(provider)
        if fault is not None and fault != "timeout":
            if fault == "refuse":
                raise _Drop
            return 500, _server_error(provider), None
        is_create = method == "POST" and sub in ("/call", "/calls")
        if fault == "timeout":
            if is_create and self.engine.config.get("timeout_creates_call", True):
                self._route(provider, method, sub, query, raw, headers)
            time.sleep(float(self.engine.config.get("timeout_seconds", 30)))
            return 504, _server_error(provider), None
        return self._route(provider, method, sub, query, raw, headers)

    def _authorized(self, header: str) -> bool:
        return header[:7].lower() == "bearer " and header[7:].strip() in self.api_keys

    def _unauthorized(self, provider: str) -> Response:
        if provider == "vapi":
            return (
                401,
                shapes.vapi_error(
                    401,
                    "Invalid Key. Hot tip, you may be using the private key instead.",
                    "Unauthorized",
                ),
                None,
            )
        return (
            401,
            {
                "detail": {
                    "status": "error",
                    "description": "Unauthorized",
                    "request_id": "sim",
                    "category": "authentication",
                }
            },
            None,
        )

    def _route(
        self, provider: str, method: str, sub: str, query: str, raw: bytes, headers: Any
    ) -> Response:
        parts = [p for p in sub.split("/") if p]
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if method == "GET" and len(parts) == 2:  # one call read (a poll or a webhook's re-read)
            self.engine.count(f"call_reads_{provider}")
        if provider == "vapi" and parts and parts[0] == "call":
            return self._vapi(method, parts[1:], params, raw, headers)
        if provider == "synthflow" and parts and parts[0] == "calls":
            return self._synthflow(method, parts[1:], params, raw)
        return (
            404,
            {"message": f"Cannot {method} {sub}", "error": "Not Found", "statusCode": 404},
            None,
        )

    # -- Vapi ------------------------------------------------------------------------------------

    def _vapi(
        self, method: str, rest: list[str], params: dict[str, str], raw: bytes, headers: Any
    ) -> Response:
        now = time.time()
        base = f"http://{headers.get('Host', '127.0.0.1')}{VAPI}"
        if method == "POST" and not rest:
            return self._vapi_create(raw, base)
        if method == "GET" and not rest:
            calls = self.engine.list("vapi")
            if "createdAtGt" in params:
                since = _epoch(params["createdAtGt"])
                calls = [c for c in calls if c.created > since]
            if "id" in params:
                calls = [c for c in calls if c.id == params["id"]]
            if "phoneNumberId" in params:
                calls = [
                    c for c in calls if c.request.get("phoneNumberId") == params["phoneNumberId"]
                ]
            limit = int(params.get("limit", 100))
            return 200, [shapes.vapi_call(c, now, base) for c in calls[:limit]], None
        call = self.engine.get(rest[0]) if rest else None
        if call is None or call.provider != "vapi":
            return 404, shapes.vapi_error(404, "Call not found", "Not Found"), None
        if method == "GET" and len(rest) == 1:
            return 200, shapes.vapi_call(call, now, base), None
        if method == "DELETE" and len(rest) == 1:
            body = shapes.vapi_call(call, now, base)
            self.engine.delete(call.id)
            return 200, body, None
        if method == "POST" and rest[1:] == ["control"]:
            return self._vapi_control(call, raw)
        return 404, shapes.vapi_error(404, "Not Found", "Not Found"), None

    def _vapi_create(self, raw: bytes, base: str) -> Response:
        body = _json(raw)
        errors = shapes.vapi_validate(body)
        if errors:
            return 400, shapes.vapi_error(400, errors, "Bad Request"), None
        if self.engine.at_capacity("vapi", time.time()):
            return self._too_many("vapi")
        correlation, queue = shapes.vapi_correlation(body)
        call = self.engine.create("vapi", correlation, queue, body["customer"]["number"], body)
        self._webhooks.schedule(call)
        out = shapes.vapi_call(call, time.time(), base, fresh=True)
        out["subscriptionLimits"] = {"concurrencyBlocked": False, "concurrencyLimit": 10}
        return 201, out, None

    def _vapi_control(self, call: SimCall, raw: bytes) -> Response:
        body = _json(raw)
        if not isinstance(body, dict) or body.get("type") != "end-call":
            return 400, shapes.vapi_error(400, ["type must be end-call"], "Bad Request"), None
        if self.engine.cancel(call.id) is not None:
            self._webhooks.schedule(call)
        return 200, {"success": True}, None

    def _too_many(self, provider: str) -> Response:
        retry = {"Retry-After": str(self.engine.config.get("retry_after_seconds", 1))}
        if provider == "vapi":
            return 429, shapes.vapi_error(429, "Too Many Requests", "Too Many Requests"), retry
        return 429, {"error": "rate_limit_exceeded", "message": "Concurrency limit reached"}, retry

    # -- SynthFlow -------------------------------------------------------------------------------

    def _synthflow(
        self, method: str, rest: list[str], params: dict[str, str], raw: bytes
    ) -> Response:
        now = time.time()
        echo = bool(self.engine.config.get("synthflow_echo_variables", True))
        if method == "POST" and not rest:
            return self._synthflow_create(raw)
        if method == "GET" and not rest:
            if not params.get("model_id"):
                return (
                    400,
                    {
                        "detail": {
                            "status": "error",
                            "description": "model_id is required",
                            "request_id": "sim",
                            "category": "validation",
                        }
                    },
                    None,
                )
            calls = [
                c
                for c in self.engine.list("synthflow")
                if c.request.get("model_id") == params["model_id"]
            ]
            if params.get("lead_phone_number"):
                calls = [c for c in calls if c.number == params["lead_phone_number"]]
            if params.get("from_date"):
                since = int(params["from_date"]) / 1000.0
                calls = [c for c in calls if c.created >= since]
            limit, offset = int(params.get("limit", 20)), int(params.get("offset", 0))
            page = [
                shapes.synthflow_item(c, now, listing=True, echo=echo)
                for c in calls[offset : offset + limit]
            ]
            return 200, shapes.synthflow_page(page, limit, offset, len(calls)), None
        call = self.engine.get(rest[0]) if method == "GET" and len(rest) == 1 else None
        if call is None or call.provider != "synthflow":
            return (
                404,
                {
                    "detail": {
                        "status": "error",
                        "description": "Call not found",
                        "request_id": "sim",
                        "category": "not_found",
                    }
                },
                None,
            )
        return (
            200,
            shapes.synthflow_page(
                [shapes.synthflow_item(call, now, listing=False, echo=echo)], 1, 0, 1
            ),
            None,
        )

    def _synthflow_create(self, raw: bytes) -> Response:
        body = _json(raw)
        errors = shapes.synthflow_validate(body)
        if errors:
            return 422, {"detail": errors}, None
        if self.engine.at_capacity("synthflow", time.time()):
            return self._too_many("synthflow")
        variables = shapes.synthflow_variables(body)
        call = self.engine.create(
            "synthflow",
            variables.get("callq_assignment_id"),
            variables.get("callq_queue_id"),
            body["phone"],
            body,
        )
        self._webhooks.schedule(call)
        return (
            200,
            {"status": "success", "response": {"answer": "ok", "call_id": call.id}, "eta": 0},
            None,
        )

    # -- control ---------------------------------------------------------------------------------

    def _control(self, method: str, path: str, query: str, raw: bytes) -> Response:
        if path == "/_sim/stats" and method == "GET":
            times = parse_qs(query).get("times", ["0"])[-1] not in ("0", "", "false")
            return 200, self.engine.stats(times=times), None
        if path == "/_sim/config" and method == "POST":
            update = _json(raw)
            if not isinstance(update, dict):
                return 400, {"error": "config must be a JSON object"}, None
            return 200, self.engine.configure(update), None
        if path == "/_sim/config" and method == "GET":
            return 200, self.engine.config, None
        if path == "/_sim/reset" and method == "POST":
            self.engine.reset()
            return 200, {"ok": True}, None
        return 404, {"error": "not found"}, None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _epoch(text: str) -> float:
    from providers._util import parse_time

    parsed = parse_time(text)
    return parsed.timestamp() if parsed else 0.0


def _server_error(provider: str) -> dict[str, Any]:
    if provider == "vapi":
        return shapes.vapi_error(500, "Internal server error", "Internal Server Error")
    return {"error": "internal_error", "message": "Internal server error"}
