"""The webhook endpoint: ``POST /webhooks/<provider_id>``, a small ASGI app served by uvicorn.

Each delivery is authenticated by the provider's adapter (``Provider.parse_webhook``): 401 when
that fails, 400 for a malformed body, 404 for an unknown provider, 413 for a body over the
limit, 408 for a body that does not arrive in time. An accepted event is answered at once and
queued; the queue is acted on in batches off the request path (:class:`Actions`,
``dispatch.policy.decide_webhook``): final reports whose whole body is authenticated (Vapi's
end-of-call-report) end their calls here, from their own data, with one look-up for the batch;
hints (SynthFlow's post-call, signed over the call id only) go out as one ``callq.webhook``
message carrying the batch's ids, and that task re-reads each call from the provider's API.

An unauthenticated request costs little: the providers' secrets are loaded off the request path
and cached for a few seconds (:class:`Directory`), so a request does no database work and
nothing that can raise on its way to the 401. The HTTP layer is bounded too (see
``worker/http_protocol.py``): a deadline for the request head, a size limit on it, a body limit
enforced while the body streams in (chunked or not), keep-alive and connection limits.

The app speaks ASGI directly (two routes; no framework): a request costs its parse, its
signature check and one write, and every answer is a body serialized once at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn

from dispatch.policy import WebhookAction, decide_webhook
from dispatch.steps import tally
from providers.base import REPLAY_WINDOW_SECONDS, Provider, WebhookEvent
from providers.errors import CallqError, ConfigError, WebhookAuthError, WebhookPayloadError
from worker import logs
from worker.settings import Settings

log = logs.get_logger("callq.webhooks")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A provider's call id travels as a task argument: short and plain, or the delivery is refused.
_CALL_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
PREFIX = "/webhooks/"
# Accepted events wait this long for company before a batch is acted on: a burst of deliveries
# (a campaign's calls ending together) becomes one broker message and one database look-up.
ACT_LINGER_SECONDS = 0.02
ACT_MAX_BATCH = 500
# Accepted events not yet acted on; past it a delivery is answered 503 (the provider retries).
ACT_MAX_PENDING = 20_000

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# Loads {provider_id: adapter, or None when the row is refused} for every active provider.
Loader = Callable[[], dict[str, Provider | None]]
# Acts on a batch of accepted events, (provider id, event) each (blocking; a worker thread).
Act = Callable[[Sequence[tuple[str, WebhookEvent]]], None]


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer, serialized once: status, JSON body and headers (``connection: close``
    when the request's body was not read)."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(
        cls, status: int, payload: dict[str, str], *, close: bool = False, allow: str = ""
    ) -> Answer:
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if close:  # a body we did not read: the connection cannot carry another request
            headers.append((b"connection", b"close"))
        if allow:
            headers.append((b"allow", allow.encode()))
        return cls(status, body, tuple(headers))


ACCEPTED = Answer.of(200, {"status": "accepted"})
DUPLICATE = Answer.of(200, {"status": "duplicate"})
MALFORMED = Answer.of(400, {"error": "malformed"})
DISCONNECTED = Answer.of(400, {"error": "disconnected"}, close=True)
UNAUTHORIZED = Answer.of(401, {"error": "unauthorized"})
UNKNOWN_PROVIDER = Answer.of(404, {"error": "unknown_provider"}, close=True)
NOT_FOUND = Answer.of(404, {"error": "not_found"})
POST_ONLY = Answer.of(405, {"error": "method_not_allowed"}, allow="POST")
GET_ONLY = Answer.of(405, {"error": "method_not_allowed"}, allow="GET, HEAD")
BODY_TIMEOUT = Answer.of(408, {"error": "body_timeout"}, close=True)
TOO_LARGE = Answer.of(413, {"error": "too_large"}, close=True)
NOT_READY = Answer.of(503, {"error": "not_ready"})
BUSY = Answer.of(503, {"error": "busy"})
HEALTHY = Answer.of(200, {"status": "ok"})
LOADING = Answer.of(503, {"status": "loading"})


class Directory:
    """The active providers' adapters by id, reloaded every ``ttl`` seconds off the request path.

    A request only reads the current mapping: it never waits on the database and nothing it
    does here can raise.
    """

    def __init__(self, load: Loader, ttl: float) -> None:
        self._load = load
        self._ttl = ttl
        self._providers: dict[str, Provider | None] = {}
        self.loaded = False

    def get(self, provider_id: str) -> tuple[bool, Provider | None]:
        """(known, adapter): known False for an unknown or inactive id; adapter None when the
        row is known but refused (misconfigured: nothing can be verified)."""
        if provider_id not in self._providers:
            return False, None
        return True, self._providers[provider_id]

    def reload(self) -> None:
        """Load every active provider now (blocking; runs in a worker thread)."""
        self._providers = self._load()
        self.loaded = True

    async def keep_fresh(self) -> None:
        """Reload forever; a failed reload keeps the last good mapping."""
        while True:
            try:
                await anyio.to_thread.run_sync(self.reload)
            except Exception as exc:
                log.warning("webhook.providers_reload_failed", error=type(exc).__name__)
            await asyncio.sleep(self._ttl if self.loaded else min(self._ttl, 1.0))


class Replays:
    """Deliveries seen in the replay window, so a replayed one enqueues nothing (bounded)."""

    def __init__(self, window: float = REPLAY_WINDOW_SECONDS, max_entries: int = 100_000) -> None:
        self._window = window
        self._max = max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, key: bytes, now: float | None = None) -> bool:
        """True the first time ``key`` is seen within the window."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._seen and (
                len(self._seen) >= self._max or next(iter(self._seen.values())) < now - self._window
            ):
                self._seen.popitem(last=False)
            if key in self._seen:
                return False
            self._seen[key] = now
            return True


class Actions:
    """Accepted events, acted on in batches off the request path.

    The first event of a batch waits ``linger`` seconds for others, then the whole batch (up to
    ``max_batch``) goes to ``act`` in one worker thread: the request path never waits on the
    broker or the database, and a burst costs one message and one look-up, not one per event.
    An event lost here (the process killed) costs only time: polling follows every placed call.
    """

    def __init__(
        self,
        act: Act,
        *,
        linger: float = ACT_LINGER_SECONDS,
        max_batch: int = ACT_MAX_BATCH,
        max_pending: int = ACT_MAX_PENDING,
    ) -> None:
        self._act = act
        self._linger = linger
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._pending: list[tuple[str, WebhookEvent]] = []
        self._wake = asyncio.Event()

    def full(self) -> bool:
        return len(self._pending) >= self._max_pending

    def put(self, provider_id: str, event: WebhookEvent) -> None:
        self._pending.append((provider_id, event))
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._linger)
            await self.flush()

    async def flush(self) -> None:
        """Act on every pending event, a batch at a time."""
        while self._pending:
            self._wake.clear()
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                await anyio.to_thread.run_sync(self._act, batch)
            except Exception as exc:
                log.warning("webhook.action_failed", count=len(batch), error=type(exc).__name__)


@dataclass(frozen=True)
class Limits:
    """Per-request bounds read from the settings."""

    max_body_bytes: int
    body_timeout: float

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.webhook_max_body_bytes, s.webhook_body_timeout_seconds)


class BodyTooLargeError(CallqError):
    """The body is over the limit (declared or streamed)."""


class ClientDisconnectError(CallqError):
    """The client went away before its body was read."""


async def read_body(receive: Receive, headers: dict[str, str], limits: Limits) -> bytes:
    """The body, refused as soon as it passes the limit (a declared length is checked first)."""
    declared = headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
        raise BodyTooLargeError
    body = bytearray()
    async with asyncio.timeout(limits.body_timeout):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnectError
            body += message.get("body", b"")
            if len(body) > limits.max_body_bytes:
                raise BodyTooLargeError
            if not message.get("more_body", False):
                return bytes(body)


def provider_in(path: str) -> str | None:
    """The provider id of ``/webhooks/<id>`` (a trailing slash allowed), lower-cased."""
    if not path.startswith(PREFIX):
        return None
    rest = path[len(PREFIX) :]
    rest = rest[:-1] if rest.endswith("/") else rest
    return rest.lower() if rest and "/" not in rest else None


def create_app(directory: Directory, act: Act, limits: Limits) -> ASGIApp:
    """The ASGI app: ``POST /webhooks/{provider_id}`` and ``GET /healthz``."""
    replays = Replays()
    actions = Actions(act)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            answer = await _route(scope, receive)
            await send({"type": "http.response.start", "status": answer.status,
                        "headers": answer.headers})  # fmt: skip
            await send({"type": "http.response.body", "body": answer.body})

    async def _route(scope: Scope, receive: Receive) -> Answer:
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            if method not in ("GET", "HEAD"):
                return GET_ONLY
            return HEALTHY if directory.loaded else LOADING
        provider_id = provider_in(path)
        if provider_id is None:
            return NOT_FOUND
        if method != "POST":
            return POST_ONLY
        known, provider = directory.get(provider_id) if _UUID.match(provider_id) else (False, None)
        if not known:
            return UNKNOWN_PROVIDER if directory.loaded else NOT_READY
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = await read_body(receive, headers, limits)
        except BodyTooLargeError:
            return TOO_LARGE
        except TimeoutError:
            return BODY_TIMEOUT
        except ClientDisconnectError:
            return DISCONNECTED
        return _verified(provider_id, provider, headers, body)

    def _verified(
        provider_id: str, provider: Provider | None, headers: dict[str, str], body: bytes
    ) -> Answer:
        if provider is None:
            return UNAUTHORIZED
        try:
            event = provider.parse_webhook(headers, body)
        except WebhookAuthError:
            log.info("webhook.unauthenticated", provider_id=provider_id)
            return UNAUTHORIZED
        except (WebhookPayloadError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.info("webhook.malformed", provider_id=provider_id, error=type(exc).__name__)
            return MALFORMED
        call_id = event.provider_call_id
        if not _CALL_ID.match(call_id):
            return MALFORMED
        if actions.full():  # before the replay record, so the provider's retry is not a replay
            return BUSY
        digest = hashlib.sha256(body).digest()
        if not replays.first_time(f"{provider_id}/{call_id}/".encode() + digest):
            return DUPLICATE
        actions.put(provider_id, event)
        return ACCEPTED

    async def _lifespan(receive: Receive, send: Send) -> None:
        """Keep the providers fresh and act on accepted events while the server runs; act on
        what is still queued before it stops."""
        await receive()  # lifespan.startup
        tasks = [
            asyncio.create_task(directory.keep_fresh()),
            asyncio.create_task(actions.run_forever()),
        ]
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await actions.flush()
        await send({"type": "lifespan.shutdown.complete"})

    return app


def load_providers() -> dict[str, Provider | None]:
    """Every active provider's adapter (None for a row the worker refuses), by id."""
    from worker import runtime

    out: dict[str, Provider | None] = {}
    for row in runtime.database().active_providers():
        provider_id = str(row.provider_id).lower()
        try:
            out[provider_id] = runtime.provider_for(row)
        except ConfigError as exc:  # its message names fields and references, never values
            log.warning("webhook.provider_refused", provider_id=provider_id, error=str(exc))
            out[provider_id] = None
    return out


def act_on(batch: Sequence[tuple[str, WebhookEvent]]) -> None:
    """End the calls of final reports (one look-up for the batch), and send the ids of hints
    as one ``callq.webhook`` message; other events change nothing."""
    from worker.tasks import end_from_reports, webhook

    decided = [(provider_id, event, decide_webhook(event)) for provider_id, event in batch]
    hints = [[p, e.provider_call_id] for p, e, action in decided if action is WebhookAction.CHECK]
    if hints:
        webhook.apply_async((hints,))
    reports = [(p, e) for p, e, action in decided if action is WebhookAction.FINISH]
    ended = tally(end_from_reports(reports)) if reports else {}
    log.info(
        "webhook.acted",
        events=len(batch),
        checked=len(hints),
        finished=len(reports),
        **{f"finished_{label}": n for label, n in ended.items()},
    )


def server(s: Settings, host: str | None = None, port: int | None = None) -> uvicorn.Server:
    """The configured uvicorn server for the real endpoint (``callq webhooks``)."""
    from worker.http_protocol import protocol_class

    app = create_app(
        Directory(load_providers, s.webhook_secret_ttl_seconds),
        act_on,
        Limits.from_settings(s),
    )
    config = uvicorn.Config(
        app,
        host=host or s.webhook_host,
        port=s.webhook_port if port is None else port,
        http=protocol_class(s.webhook_header_timeout_seconds, s.webhook_max_header_bytes),
        loop="asyncio",
        lifespan="on",
        limit_concurrency=s.webhook_max_connections,
        timeout_keep_alive=s.webhook_keepalive_seconds,
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,
    )
    return uvicorn.Server(config)
