"""End-of-call webhooks from the simulator: one thread, started on first use, sends each call's
webhooks when it ends (Vapi: status-update + end-of-call-report, signed per config; SynthFlow:
the post-call body with ``Synthflow-Signature``).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import threading
import time

import httpx

from providers.simulator import shapes
from providers.simulator.engine import Engine, SimCall

VAPI = "/vapi"


class WebhookSender:
    """Posts end-of-call webhooks when calls end (one thread, started on first use)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._heap: list[tuple[float, int, SimCall]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._client: httpx.Client | None = None

    def url_for(self, call: SimCall) -> str | None:
        """Where this call's webhooks go, if anywhere."""
        cfg = self._engine.config
        if call.provider == "vapi":
            for holder in (call.request.get("assistantOverrides"), call.request.get("assistant")):
                if isinstance(holder, dict) and isinstance(holder.get("server"), dict):
                    url = holder["server"].get("url")
                    if url:
                        return str(url)
            return cfg.get("vapi_webhook_url") or cfg.get("webhook_url")
        return cfg.get("synthflow_webhook_url") or cfg.get("webhook_url")

    def schedule(self, call: SimCall) -> None:
        """Queue the call's end-of-call webhook for when it ends."""
        if self.url_for(call) is None or call.end_at == float("inf"):
            return
        with self._cond:
            if self._thread is None:
                self._client = httpx.Client(timeout=5.0)
                self._thread = threading.Thread(target=self._run, name="sim-webhooks", daemon=True)
                self._thread.start()
            self._seq += 1
            heapq.heappush(self._heap, (call.end_at, self._seq, call))
            self._cond.notify()

    def stop(self) -> None:
        """Stop the thread (pending webhooks are dropped)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._client is not None:
            self._client.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.time()):
                    timeout = self._heap[0][0] - time.time() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, call = heapq.heappop(self._heap)
            if call.end_at <= time.time() and not call.webhook_sent:
                call.webhook_sent = True
                self._deliver(call)

    def _deliver(self, call: SimCall) -> None:
        url = self.url_for(call)
        assert self._client is not None
        try:
            for body, headers in self._payloads(call):
                self._client.post(url or "", content=body, headers=headers)
            self._engine.count("webhooks_sent")
        except httpx.HTTPError:
            self._engine.count("webhooks_failed")

    def _payloads(self, call: SimCall) -> list[tuple[bytes, dict[str, str]]]:
        cfg = self._engine.config
        secret = str(cfg.get("webhook_secret") or "")
        now = time.time()
        if call.provider == "synthflow":
            body = json.dumps(shapes.synthflow_webhook(call, now)).encode()
            digest = hmac.new(secret.encode(), call.id.encode(), hashlib.sha256).digest()
            return [
                (
                    body,
                    {
                        "Content-Type": "application/json",
                        "Synthflow-Signature": base64.b64encode(digest).decode(),
                    },
                )
            ]
        vapi_call = shapes.vapi_call(call, now, "http://sim" + VAPI)
        messages = [
            {
                "type": "status-update",
                "status": "ended",
                "endedReason": vapi_call.get("endedReason"),
                "call": vapi_call,
                "timestamp": int(now * 1000),
            },
            {
                "type": "end-of-call-report",
                "endedReason": vapi_call.get("endedReason"),
                "artifact": vapi_call.get("artifact", {}),
                "analysis": {},
                "call": vapi_call,
                "timestamp": int(now * 1000),
            },
        ]
        return [self._vapi_signed(json.dumps({"message": m}).encode(), secret) for m in messages]

    def _vapi_signed(self, body: bytes, secret: str) -> tuple[bytes, dict[str, str]]:
        mode = self._engine.config.get("vapi_webhook_auth", "hmac")
        headers = {"Content-Type": "application/json"}
        if mode == "header":
            headers["X-Vapi-Secret"] = secret
        elif mode == "bearer":
            headers["Authorization"] = f"Bearer {secret}"
        else:
            timestamp = str(int(time.time() * 1000))
            message = f"{timestamp}.".encode() + body
            headers["x-timestamp"] = timestamp
            headers["x-signature"] = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
        return body, headers
