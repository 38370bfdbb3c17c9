"""End-of-call webhooks from the simulator: sender threads, started on first use, send each call's
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
import zlib

import httpx

from providers._transport import ThreadLocalTransport
from providers.simulator import retell, shapes
from providers.simulator.engine import Engine, SimCall

VAPI = "/vapi"
ANALYSIS_DELAY = 0.05  # call_analyzed follows call_ended once post-call analysis is done


class WebhookSender:
    """Posts each call's webhooks when they fall due, from ``webhook_senders`` threads (config,
    started on first use): a call's webhooks always go out from the same thread, in order, and
    different calls' concurrently, as a provider's many senders do (one thread for every call
    made a thousand calls ending together a queue of two thousand posts in a row)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lanes: list[_Lane] = []
        self._lock = threading.Lock()
        self._stopped = False

    def url_for(self, call: SimCall) -> str | None:
        """Where this call's webhooks go, if anywhere (a per-call URL first)."""
        cfg = self._engine.config
        if call.provider == "vapi":
            for holder in (call.request.get("assistantOverrides"), call.request.get("assistant")):
                if isinstance(holder, dict) and isinstance(holder.get("server"), dict):
                    url = holder["server"].get("url")
                    if url:
                        return str(url)
        if call.provider == "retell":
            agent = (call.request.get("agent_override") or {}).get("agent") or {}
            if agent.get("webhook_url"):
                return str(agent["webhook_url"])
        return cfg.get(f"{call.provider}_webhook_url") or cfg.get("webhook_url")

    def schedule(self, call: SimCall) -> None:
        """Queue the call's webhooks: at its end, and for Retell ``call_started`` at answer."""
        if self.url_for(call) is None or call.end_at == float("inf"):
            return
        events = [(call.end_at, "end")]
        if call.provider == "retell":
            events = [(call.end_at, "call_ended"), (call.end_at + ANALYSIS_DELAY, "call_analyzed")]
            if call.answer_at is not None and call.answer_at < call.end_at:
                events.append((call.answer_at, "call_started"))
        with self._lock:
            if self._stopped:
                return
            if not self._lanes:
                count = max(1, int(self._engine.config.get("webhook_senders") or 1))
                self._lanes = [_Lane(self, n) for n in range(count)]
            lane = self._lanes[zlib.crc32(call.id.encode()) % len(self._lanes)]
        lane.push(call, events)

    def stop(self) -> None:
        """Stop the threads (pending webhooks are dropped)."""
        with self._lock:
            self._stopped = True
            lanes = list(self._lanes)
        for lane in lanes:  # all told first: a lane in a slow post holds up no other
            lane.stop()
        for lane in lanes:
            lane.join()

    def deliver(self, client: httpx.Client, call: SimCall, kind: str) -> None:
        """Post one event's webhooks (Vapi's status-update and end-of-call-report in order)."""
        url = self.url_for(call)
        try:
            for body, headers in self._payloads(call, kind):
                client.post(url or "", content=body, headers=headers)
            self._engine.count("webhooks_sent")
        except httpx.HTTPError:
            self._engine.count("webhooks_failed")

    def _payloads(self, call: SimCall, kind: str) -> list[tuple[bytes, dict[str, str]]]:
        cfg = self._engine.config
        secret = str(cfg.get("webhook_secret") or "")
        now = time.time()
        if call.provider == "retell":
            return [retell_payload(call, kind, now)]
        if call.provider == "synthflow":
            body = json.dumps(shapes.synthflow_webhook(call, now)).encode()
            digest = hmac.new(secret.encode(), call.id.encode(), hashlib.sha256).digest()
            headers = {
                "Content-Type": "application/json",
                "Synthflow-Signature": base64.b64encode(digest).decode(),
            }
            return [(body, headers)]
        return [self._vapi_signed(json.dumps({"message": m}).encode(), secret)
                for m in vapi_messages(call, now)]  # fmt: skip

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


class _Lane:
    """One sender thread: its calls' webhooks in the order they fall due, one post at a time."""

    def __init__(self, sender: WebhookSender, number: int) -> None:
        self._sender = sender
        self._heap: list[tuple[float, int, SimCall, str]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._stopped = False
        # the adapters' transport (http.client, a kept connection per thread): httpx's default
        # pool cost the simulator most of its CPU when a thousand calls ended together, on the
        # machine the benchmarks share with the fleet they measure
        self.client = httpx.Client(timeout=5.0, transport=ThreadLocalTransport())
        name = f"sim-webhooks-{number}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def push(self, call: SimCall, events: list[tuple[float, str]]) -> None:
        with self._cond:
            for when, kind in events:
                self._seq += 1
                heapq.heappush(self._heap, (when, self._seq, call, kind))
            self._cond.notify()

    def stop(self) -> None:
        """Tell the thread to stop after its current post (pending webhooks are dropped)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def join(self) -> None:
        """Wait for the thread (at most one post's timeout), then close its client."""
        self._thread.join(timeout=5)
        self.client.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.time()):
                    timeout = self._heap[0][0] - time.time() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, call, kind = heapq.heappop(self._heap)
            # a canceled call's end moved earlier: its old end entry must not fire twice
            due = call.end_at <= time.time()
            if kind == "call_started":  # only if the callee answered before any cancel
                due = call.answer_at is not None and call.answer_at <= call.end_at
            if due and kind not in call.webhooks_sent:
                call.webhooks_sent.add(kind)
                self._sender.deliver(self.client, call, kind)


def vapi_messages(call: SimCall, now: float) -> list[dict[str, object]]:
    """``status-update`` (ended) and ``end-of-call-report`` server messages for an ended call."""
    vapi_call = shapes.vapi_call(call, now, "http://sim" + VAPI)
    stamp = int(now * 1000)
    report: dict[str, object] = {
        "type": "end-of-call-report", "endedReason": vapi_call.get("endedReason"),
        "artifact": vapi_call.get("artifact", {}), "analysis": {}, "call": vapi_call,
        "customer": vapi_call.get("customer"), "timestamp": stamp,
    }  # fmt: skip
    for key in ("startedAt", "endedAt", "cost"):
        if key in vapi_call:
            report[key] = vapi_call[key]
    update = {
        "type": "status-update", "status": "ended", "endedReason": vapi_call.get("endedReason"),
        "call": vapi_call, "timestamp": stamp,
    }  # fmt: skip
    return [update, report]


def retell_payload(call: SimCall, kind: str, now: float) -> tuple[bytes, dict[str, str]]:
    """``{event, call}`` signed ``v=<ms>,d=<hex HMAC-SHA256(key, body + ms)>`` with the key
    that created the call (Retell signs with the account's API key)."""
    view = retell.phone_call(call, now, analyzed=kind == "call_analyzed")
    body = json.dumps({"event": kind, "call": view}, separators=(",", ":")).encode()
    stamp = str(int(now * 1000))
    digest = hmac.new((call.account_key or "").encode(), body + stamp.encode(), hashlib.sha256)
    headers = {
        "Content-Type": "application/json",
        "x-retell-signature": f"v={stamp},d={digest.hexdigest()}",
    }
    return body, headers
