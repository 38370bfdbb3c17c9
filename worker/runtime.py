"""Per-process resources: the database pool and one provider adapter per provider row."""

from __future__ import annotations

import contextvars
import hashlib
import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from models.calls import ProviderRow
from models.queries import Database
from providers.base import Provider, ProviderConfig
from providers.registry import build_provider
from worker.settings import Settings, get_settings

_lock = threading.Lock()
_db: Database | None = None
_providers: dict[str, tuple[str, Provider]] = {}
# One pool of threads per lane, so one kind of work never queues behind another: "dispatch"
# (creates of dispatch_batch chunks), "fresh" (the creates of the chunk a poll places itself:
# the calls it just claimed, so a newcomer's first call never waits behind a backlog's creates),
# "track" (provider reads), "listen" (the chunks the worker's LISTEN thread claimed, placed off
# that thread so it can claim the next notification's calls meanwhile), "end" (the webhook
# server's endings: database work only, so fewer threads, CALLQ_WEBHOOK_END_THREADS).
_executors: dict[str, ThreadPoolExecutor] = {}
LANES = ("dispatch", "fresh", "track", "listen", "end")
T = TypeVar("T")
R = TypeVar("R")
# Calls being placed in this process, and when the last burst's chunk ended (``is_placing``).
_placing = 0
_burst_at = float("-inf")
BURST_CALLS = 10  # a chunk of this many calls or more is a burst's
BURST_GRACE_SECONDS = 1.0  # between a burst's chunks the process still counts as placing
# Work submitted to each lane and not yet finished (``submit``, ``pending``), and each lane's
# waiting items (``map_in_context``); their own lock, never held while waiting (``reset`` holds
# ``_lock`` while the pools' threads finish).
_pending: dict[str, int] = {}
_lanes_lock = threading.Lock()


def database(settings: Settings | None = None) -> Database:
    """This process's database pool, created on first use (after any fork)."""
    global _db
    if _db is None:
        with _lock:
            if _db is None:
                s = settings or get_settings()
                _db = Database(
                    s.require_database_url(), max_size=s.db_pool_size, pooled=s.database_pooler
                )
    return _db


def executor(lane: str = "dispatch") -> ThreadPoolExecutor:
    """Threads that place (or poll) the calls of one chunk concurrently, one pool per lane."""
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}")
    pool = _executors.get(lane)
    if pool is None:
        with _lock:
            pool = _executors.get(lane)
            if pool is None:
                s = get_settings()
                threads = s.webhook_end_threads if lane == "end" else s.dispatch_threads
                pool = ThreadPoolExecutor(threads, thread_name_prefix=f"callq-{lane}")
                _executors[lane] = pool
    return pool


def submit(lane: str, fn: Callable[..., object], *args: object) -> Future[object]:
    """``fn(*args)`` on the lane's pool, in a copy of the caller's context (its log context);
    counted in ``pending(lane)`` until it ends."""
    pool = executor(lane)
    with _lanes_lock:
        _pending[lane] = _pending.get(lane, 0) + 1

    def run() -> object:
        try:
            return fn(*args)
        finally:
            with _lanes_lock:
                _pending[lane] -= 1

    try:
        return pool.submit(contextvars.copy_context().run, run)
    except BaseException:  # (a pool shut down): never runs, never counted
        with _lanes_lock:
            _pending[lane] -= 1
        raise


def pending(lane: str) -> int:
    """How many pieces of work ``submit`` gave the lane that have not finished yet."""
    return _pending.get(lane, 0)


def provider_config(row: ProviderRow) -> ProviderConfig:
    """The adapter configuration for a provider row loaded by ``models.queries``."""
    s = get_settings()
    config = dict(row.config)
    # Creates are paced fleet-wide by reserve_provider_create (worker/tasks.py), from the same
    # row's creates_per_second; the adapter's own per-process bucket would only add waits.
    config["creates_per_second"] = 0
    config.setdefault("connect_timeout", s.http_connect_timeout_seconds)
    config.setdefault("read_timeout", s.http_read_timeout_seconds)
    if s.webhook_public_url:
        config.setdefault(
            "webhook_url", f"{s.webhook_public_url.rstrip('/')}/webhooks/{row.provider_id}"
        )
    return ProviderConfig.from_row(
        {
            "id": str(row.provider_id),
            "name": row.name,
            "provider_type": row.provider_type,
            "api_key": row.api_key,
            "api_secret": row.api_secret,
            "webhook_secret": row.webhook_secret,
            "base_url": row.base_url,
            "max_concurrent_calls": row.max_concurrent_calls,
            "capabilities": row.capabilities,
            "config": config,
            # the reaper takes a dialing call back after this: the create throttle waits less
            "dial_lease_seconds": float(s.lease_seconds),
        },
        s.provider_allowlist,
    )


def provider_for(row: ProviderRow) -> Provider:
    """The cached adapter for this provider row; rebuilt when the row's settings change."""
    key = str(row.provider_id)
    fingerprint = _fingerprint(row)
    with _lock:
        cached = _providers.get(key)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        provider = build_provider(provider_config(row))
        if cached is not None:
            cached[1].close()
        _providers[key] = (fingerprint, provider)
        return provider


def expects_webhooks(row: ProviderRow) -> bool:
    """True when this provider reports a call's end by webhook: it has a webhook secret, and
    (Vapi) it is told where to post (``CALLQ_WEBHOOK_PUBLIC_URL``); SynthFlow takes its URL
    from the agent's settings. Such calls are polled only as a safety net."""
    if not (row.webhook_secret or row.api_secret):
        return False
    return row.provider_type != "vapi" or bool(get_settings().webhook_public_url)


def map_in_context(fn: Callable[[T], R], items: Iterable[T], lane: str = "dispatch") -> list[R]:
    """``fn`` over ``items`` on the lane's pool, each in a copy of the caller's context.

    The copy carries the task's log context (task id) into the pool's threads; what ``fn``
    binds (the call's ids) stays in its own copy and never leaks into the next item. A single
    item runs in the caller's thread (in its own copy too): a call that trickles in alone
    pays for no thread hand-off.

    The lane's threads take items best rank first, an item's rank being its place in
    ``items`` (``_RankedQueue``): a chunk in claim order has its first calls, a newcomer's
    among them, placed before the last calls of chunks that came earlier.
    """
    items = list(items)
    if len(items) <= 1:  # nothing to overlap: no hand-off to the pool and back
        return [contextvars.copy_context().run(fn, item) for item in items]
    pool = executor(lane)
    queue = _ranked_queue(lane)
    futures: list[Future[R]] = []
    for rank, item in enumerate(items):
        future: Future[R] = Future()
        queue.put(rank, _Job(future, contextvars.copy_context(), fn, item))
        futures.append(future)
        try:
            pool.submit(queue.run_best)
        except RuntimeError:  # the pool is shut down: this thread takes the item's turn itself
            queue.run_best()  # (every item put is matched by one run_best: none is left behind)
    return [future.result() for future in futures]


@dataclass
class _Job(Generic[T, R]):
    future: Future[R]
    context: contextvars.Context
    fn: Callable[[T], R]
    item: T

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.context.run(self.fn, self.item))
        except BaseException as exc:
            self.future.set_exception(exc)


class _RankedQueue:
    """A lane's waiting items, best rank first: an item's rank is its place in its chunk, which
    is the claim's fair order, so the first calls of a chunk claimed now (a newcomer's among
    them) go before the last calls of chunks that came earlier. Each pool task runs the best
    item waiting when a thread takes it up (one task per item, so none is left behind)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, _Job[Any, Any]]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def put(self, rank: int, job: _Job[Any, Any]) -> None:
        with self._lock:
            heapq.heappush(self._heap, (rank, next(self._seq), job))

    def run_best(self) -> None:
        with self._lock:
            job = heapq.heappop(self._heap)[2]
        job.run()


_ranked: dict[str, _RankedQueue] = {}


def _ranked_queue(lane: str) -> _RankedQueue:
    with _lanes_lock:
        return _ranked.setdefault(lane, _RankedQueue())


def reset() -> None:
    """Close everything (process shutdown, tests); forget the last burst (``is_placing``; the
    count of calls in flight balances itself)."""
    global _db, _burst_at
    with _lock:
        _burst_at = float("-inf")
        for pool in _executors.values():
            pool.shutdown(wait=True)
        _executors.clear()
        for _, provider in _providers.values():
            provider.close()
        _providers.clear()
        if _db is not None:
            _db.close()
            _db = None


def _fingerprint(row: ProviderRow) -> str:
    fields = (
        "provider_type",
        "api_key",
        "api_secret",
        "webhook_secret",
        "base_url",
        "config",
        "capabilities",
    )
    blob = json.dumps({f: getattr(row, f) for f in fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@contextmanager
def placing(calls: int) -> Iterator[None]:
    """Mark ``calls`` calls being placed (a chunk's gates, creates and their record) in this
    process."""
    global _placing, _burst_at
    with _lock:
        _placing += calls
    try:
        yield
    finally:
        with _lock:
            _placing -= calls
            if calls >= BURST_CALLS:
                _burst_at = time.monotonic()


def is_placing() -> bool:
    """Whether this process is placing a burst: ``BURST_CALLS`` calls or more in flight now, or
    a burst's chunk ended within the last second. Its tracking tick then leaves the polls that
    can wait (``track_defer_seconds``). Calls that trickle in, placed one or a few at a time,
    defer no poll."""
    return _placing >= BURST_CALLS or time.monotonic() - _burst_at < BURST_GRACE_SECONDS
