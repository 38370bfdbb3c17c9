"""The webhook endpoint: ``POST /webhooks/<provider_id>``, served by uvicorn + starlette.

Each delivery is authenticated by the provider's adapter (``Provider.parse_webhook``): 401 when
that fails, 400 for a malformed body, 404 for an unknown provider, 413 for a body over the
limit, 408 for a body that does not arrive in time. An accepted event is answered at once, then
acted on (``dispatch.policy.decide_webhook``): a final report whose whole body is authenticated
(Vapi's end-of-call-report) ends the call here, from its own data; a hint (SynthFlow's
post-call, signed over the call id only) enqueues ``callq.webhook`` with ids, and that task
re-reads the call from the provider's API.

An unauthenticated request costs little: the providers' secrets are loaded off the request path
and cached for a few seconds (:class:`Directory`), so a request does no database work and
nothing that can raise on its way to the 401. The HTTP layer is bounded too (see
``worker/http_protocol.py``): a deadline for the request head, a size limit on it, a body limit
enforced while the body streams in (chunked or not), keep-alive and connection limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dispatch.policy import WebhookAction, decide_webhook
from providers.base import REPLAY_WINDOW_SECONDS, Provider, WebhookEvent
from providers.errors import CallqError, ConfigError, WebhookAuthError, WebhookPayloadError
from worker import logs
from worker.settings import Settings

log = logs.get_logger("callq.webhooks")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A provider's call id travels as a task argument: short and plain, or the delivery is refused.
_CALL_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")

# Loads {provider_id: adapter, or None when the row is refused} for every active provider.
Loader = Callable[[], dict[str, Provider | None]]
# Acts on one accepted event (blocking; runs in a worker thread after the answer is sent).
Act = Callable[[str, WebhookEvent], None]


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


def reply(status: int, payload: dict[str, str], *, close: bool = False) -> Response:
    """A small JSON answer; ``close`` ends the connection (a body we did not read)."""
    headers = {"connection": "close"} if close else None
    return JSONResponse(payload, status_code=status, headers=headers)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused as soon as it passes the limit (a declared length is checked first)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
        raise BodyTooLargeError
    body = bytearray()
    async with asyncio.timeout(limits.body_timeout):
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise BodyTooLargeError
    return bytes(body)


def create_app(directory: Directory, act: Act, limits: Limits) -> Starlette:
    """The ASGI app: ``POST /webhooks/{provider_id}`` and ``GET /healthz``."""
    replays = Replays()

    async def receive(request: Request) -> Response:
        provider_id = str(request.path_params["provider_id"]).lower()
        known, provider = directory.get(provider_id) if _UUID.match(provider_id) else (False, None)
        if not known:
            if not directory.loaded:
                return reply(503, {"error": "not_ready"})
            return reply(404, {"error": "unknown_provider"}, close=True)
        try:
            body = await read_body(request, limits)
        except BodyTooLargeError:
            return reply(413, {"error": "too_large"}, close=True)
        except TimeoutError:
            return reply(408, {"error": "body_timeout"}, close=True)
        except ClientDisconnect:
            return reply(400, {"error": "disconnected"}, close=True)
        return await _verified(provider_id, provider, request, body)

    async def _verified(
        provider_id: str, provider: Provider | None, request: Request, body: bytes
    ) -> Response:
        if provider is None:
            return reply(401, {"error": "unauthorized"})
        try:
            event = provider.parse_webhook(request.headers, body)
        except WebhookAuthError:
            log.info("webhook.unauthenticated", provider_id=provider_id)
            return reply(401, {"error": "unauthorized"})
        except (WebhookPayloadError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.info("webhook.malformed", provider_id=provider_id, error=type(exc).__name__)
            return reply(400, {"error": "malformed"})
        call_id = event.provider_call_id
        if not _CALL_ID.match(call_id):
            return reply(400, {"error": "malformed"})
        digest = hashlib.sha256(body).digest()
        if not replays.first_time(f"{provider_id}/{call_id}/".encode() + digest):
            return reply(200, {"status": "duplicate"})
        # Answered first, acted on right after: the provider never waits on our broker or
        # database. A lost event costs only time: polling follows every placed call anyway.
        response = reply(200, {"status": "accepted"})
        response.background = BackgroundTask(_act, provider_id, event)
        return response

    async def _act(provider_id: str, event: WebhookEvent) -> None:
        try:
            await anyio.to_thread.run_sync(act, provider_id, event)
        except Exception as exc:
            log.warning("webhook.action_failed", provider_id=provider_id, error=type(exc).__name__)

    async def healthz(_: Request) -> Response:
        return reply(
            200 if directory.loaded else 503, {"status": "ok" if directory.loaded else "loading"}
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(directory.keep_fresh())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return Starlette(
        routes=[
            Route("/webhooks/{provider_id}", receive, methods=["POST"]),
            Route("/webhooks/{provider_id}/", receive, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


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


def act_on(provider_id: str, event: WebhookEvent) -> None:
    """End the call from a final report, or enqueue ``callq.webhook`` with ids for a hint."""
    from worker.tasks import end_from_report, webhook

    action = decide_webhook(event)
    if action is WebhookAction.FINISH:
        end_from_report(provider_id, event)
    elif action is WebhookAction.CHECK:
        webhook.apply_async((provider_id, event.provider_call_id))
    log.info("webhook.acted", provider_id=provider_id, event_type=event.event_type, action=action)


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
