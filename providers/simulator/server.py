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

from providers.simulator.apis import Response, SynthflowApi, VapiApi, parse_json
from providers.simulator.engine import Engine
from providers.simulator.retell import RetellApi
from providers.simulator.webhooks import WebhookSender

DEFAULT_API_KEYS = "sim-vapi-key,sim-synthflow-key,sim-retell-key"
Api = VapiApi | SynthflowApi | RetellApi


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

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

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
        except Exception:  # a simulator bug answers 500 (visible), never a dropped connection
            self.server.sim.engine.count("handler_errors")
            status, body, headers = 500, {"message": "simulator error", "statusCode": 500}, None
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
        self.apis: tuple[Api, ...] = (
            VapiApi(self.engine, self._webhooks),
            SynthflowApi(self.engine, self._webhooks),
            RetellApi(self.engine, self._webhooks),
        )

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
        return self.base_url + VapiApi.prefix

    @property
    def synthflow_url(self) -> str:
        """The ``base_url`` to configure on a SynthFlow provider row."""
        return self.base_url + SynthflowApi.prefix

    @property
    def retell_url(self) -> str:
        """The ``base_url`` to configure on a Retell provider row."""
        return self.base_url + RetellApi.prefix

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
        api = next((a for a in self.apis if path.startswith(a.prefix + "/")), None)
        if api is None:
            return 404, {"message": "Not Found", "statusCode": 404}, None
        sub = path[len(api.prefix) :]
        if not api.open_path(sub) and not self._authorized(headers.get("Authorization", "")):
            return api.unauthorized()
        latency = float(self.engine.config.get("latency_ms") or 0)
        if latency:
            time.sleep(latency / 1000.0)
        fault = self.engine.fault(api.name)
        if fault is not None and fault != "timeout":
            if fault == "refuse":
                raise _Drop
            return api.server_error()
        if fault == "timeout":
            if api.is_create(method, sub) and self.engine.config.get("timeout_creates_call", True):
                self._route(api, method, sub, query, raw, headers)
            time.sleep(float(self.engine.config.get("timeout_seconds", 30)))
            return 504, api.server_error()[1], None
        return self._route(api, method, sub, query, raw, headers)

    def _authorized(self, header: str) -> bool:
        return header[:7].lower() == "bearer " and header[7:].strip() in self.api_keys

    def _route(
        self, api: Api, method: str, sub: str, query: str, raw: bytes, headers: Any
    ) -> Response:
        parts = [p for p in sub.split("/") if p]
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if api.is_call_read(method, parts):  # one call read (a poll or a webhook's re-read)
            self.engine.count(f"call_reads_{api.name}")
        answer = api.route(method, parts, params, raw, headers)
        return answer if answer is not None else api.not_found(method, sub)

    # -- control ---------------------------------------------------------------------------------

    def _control(self, method: str, path: str, query: str, raw: bytes) -> Response:
        if path == "/_sim/stats" and method == "GET":
            times = parse_qs(query).get("times", ["0"])[-1] not in ("0", "", "false")
            return 200, self.engine.stats(times=times), None
        if path == "/_sim/config" and method == "POST":
            update = parse_json(raw)
            if not isinstance(update, dict):
                return 400, {"error": "config must be a JSON object"}, None
            return 200, self.engine.configure(update), None
        if path == "/_sim/config" and method == "GET":
            return 200, self.engine.config, None
        if path == "/_sim/reset" and method == "POST":
            self.engine.reset()
            return 200, {"ok": True}, None
        return 404, {"error": "not found"}, None
