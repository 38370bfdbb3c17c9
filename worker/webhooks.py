"""The webhook endpoint: ``POST /webhooks/<provider_id>`` from Vapi or SynthFlow.

Each request is authenticated by the provider's adapter (Vapi secret or HMAC, SynthFlow
signature): 401 when that fails, 400 for a malformed body, 404 for an unknown provider. An
accepted final report whose whole body is authenticated (Vapi's end-of-call-report) ends the
call here, from its own data; a hint (SynthFlow's post-call, signed over the call id only)
enqueues ``callq.webhook`` with ids, and that task re-reads the call from the provider's API.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dispatch.policy import WebhookAction, decide_webhook
from providers.errors import WebhookAuthError, WebhookPayloadError
from worker import logs, runtime

log = logs.get_logger("callq.webhooks")
_PATH = re.compile(r"^/webhooks/([0-9a-fA-F-]{36})/?$")
MAX_BODY = 2 * 1024 * 1024


class WebhookHandler(BaseHTTPRequestHandler):
    """Authenticate, parse, enqueue by id, answer fast."""

    protocol_version = "HTTP/1.1"
    server_version = "callq-webhooks"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(HTTPStatus.OK, {"status": "ok"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not_found"})

    def do_POST(self) -> None:
        match = _PATH.match(self.path.split("?", 1)[0])
        if match is None:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not_found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "too_large"})
            return
        body = self.rfile.read(length)
        self._reply(*handle_webhook(match.group(1), dict(self.headers.items()), body))

    def _reply(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default access log (it would print paths and client addresses)."""


def handle_webhook(
    provider_id: str, headers: dict[str, str], body: bytes
) -> tuple[HTTPStatus, dict[str, Any]]:
    """Authenticate and parse one delivery; enqueue a re-read of the call it names."""
    from worker.tasks import end_from_report, webhook

    found = runtime.provider_by_id(provider_id)
    if found is None:
        return HTTPStatus.NOT_FOUND, {"error": "unknown_provider"}
    _, provider = found
    try:
        event = provider.parse_webhook(headers, body)
    except WebhookAuthError:
        log.warning("webhook.unauthenticated", provider_id=provider_id)
        return HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"}
    except WebhookPayloadError as exc:
        log.warning("webhook.malformed", provider_id=provider_id, error=str(exc))
        return HTTPStatus.BAD_REQUEST, {"error": "malformed"}
    action = decide_webhook(event)
    if action is WebhookAction.FINISH:
        end_from_report(provider_id, event)
    elif action is WebhookAction.CHECK and event.provider_call_id:
        webhook.apply_async((provider_id, event.provider_call_id))
    log.info(
        "webhook.accepted", provider_id=provider_id, event_type=event.event_type, action=action
    )
    return HTTPStatus.OK, {"status": "accepted"}


def serve(host: str, port: int) -> ThreadingHTTPServer:
    """Bind the webhook server (the caller runs ``serve_forever``)."""
    server = ThreadingHTTPServer((host, port), WebhookHandler)
    server.daemon_threads = True
    return server
