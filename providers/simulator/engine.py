"""The simulator's state: calls, their seeded outcomes and timelines, config and counters.

Nothing ticks: a call's status is computed from its timestamps whenever it is read. All
public methods are thread-safe (one lock, held only for dictionary work).
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import math
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

OUTCOMES = (
    "completed",
    "busy",
    "no_answer",
    "voicemail",
    "failed",
    "failed_permanent",
    "failed_after_answer",
    "stuck",
)
ANSWERED = frozenset({"completed", "voicemail", "failed_after_answer", "stuck"})

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "outcome_mix": {
        "completed": 0.6,
        "busy": 0.1,
        "no_answer": 0.15,
        "voicemail": 0.1,
        "failed": 0.05,
    },
    "outcomes_by_suffix": {},
    "queue_seconds": 0.1,
    "ring_seconds": 0.5,
    "call_seconds": 2.0,  # a number or [min, max]
    "answer_at_once": False,  # every call has ended by the time its create returns
    "latency_ms": 0,
    "error_rate": 0.0,  # share of API requests answered with a 500 (before any effect)
    "outages": [],  # [{"start": s, "end": s, "mode": "500"|"refuse"|"timeout", "provider": ...}]
    "timeout_seconds": 30.0,  # how long a "timeout" outage holds the request
    "timeout_creates_call": True,  # a create that times out still places the call
    "max_concurrent": None,  # int, or {"vapi": n, "synthflow": n}: 429 beyond it
    "retry_after_seconds": 1,
    "webhook_url": None,
    "vapi_webhook_url": None,
    "synthflow_webhook_url": None,
    "webhook_secret": "sim-webhook-secret",
    "vapi_webhook_auth": "hmac",  # "hmac" | "header" (X-Vapi-Secret) | "bearer"
    "retell_webhook_url": None,
    "webhook_senders": 8,  # threads posting webhooks: one call's in order, calls concurrently
    "synthflow_echo_variables": True,
    "record_times": True,
    "clock_resolution_ms": 1,  # createdAt granularity; a coarse clock makes equal timestamps
}


@dataclass(frozen=True)
class Features:
    """The per-call features a create asked for, in provider-neutral terms."""

    max_seconds: float | None = None
    voicemail_detect: bool = True
    leave_message: bool = False
    record: bool = True


@dataclass
class SimCall:
    """One simulated call and its precomputed timeline (wall-clock epoch seconds)."""

    id: str
    provider: str
    correlation_id: str | None
    queue_id: str | None
    number: str
    created: float
    outcome: str
    ring_at: float
    answer_at: float | None
    end_at: float
    request: dict[str, Any] = field(default_factory=dict)
    canceled: bool = False
    webhooks_sent: set[str] = field(default_factory=set)
    scheduled_until: float | None = None
    features: Features = field(default_factory=Features)
    hit_max_duration: bool = False
    account_key: str | None = None
    updated: float | None = None

    def phase(self, now: float) -> str:
        """scheduled | queued | ringing | in-progress | ended."""
        if now >= self.end_at:
            return "ended"
        if self.scheduled_until is not None and now < self.scheduled_until:
            return "scheduled"
        if self.answer_at is not None and now >= self.answer_at:
            return "in-progress"
        return "ringing" if now >= self.ring_at else "queued"

    @property
    def final_outcome(self) -> str:
        """The outcome once ended (``canceled`` when ended early through the API)."""
        return "canceled" if self.canceled else self.outcome


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; nested dicts merge, other values replace."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "outcome_mix":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Engine:
    """Calls, config and counters shared by all request threads."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self.config: dict[str, Any] = merge(DEFAULT_CONFIG, config or {})
        self._reset_state()

    def _reset_state(self) -> None:
        self.calls: dict[str, SimCall] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self.creates: Counter[str] = Counter()
        self.creates_by_queue: Counter[str] = Counter()
        self.create_times: dict[str, list[dict[str, float]]] = {}
        self.counters: Counter[str] = Counter()
        self._ends: list[tuple[float, str]] = []
        self._active: set[str] = set()
        self._rng = random.Random(self.config.get("seed", 0))
        self._anchor = time.monotonic()

    # -- config ----------------------------------------------------------------------------------

    def configure(self, update: dict[str, Any]) -> dict[str, Any]:
        """Merge ``update`` into the config; outage windows restart from now."""
        with self._lock:
            self.config = merge(self.config, update)
            if "seed" in update:
                self._rng = random.Random(self.config["seed"])
            if "outages" in update:
                self._anchor = time.monotonic()
            return copy.deepcopy(self.config)

    def reset(self, config: dict[str, Any] | None = None) -> None:
        """Forget every call and counter; optionally replace the config."""
        with self._lock:
            if config is not None:
                self.config = merge(DEFAULT_CONFIG, config)
            self._reset_state()

    # -- faults ----------------------------------------------------------------------------------

    def fault(self, provider: str) -> str | None:
        """The fault to inject into this request: an outage mode, ``"500"`` or None."""
        with self._lock:
            elapsed = time.monotonic() - self._anchor
            for outage in self.config.get("outages") or []:
                target = outage.get("provider", "all")
                if target not in ("all", "*", provider):
                    continue
                if float(outage.get("start", 0)) <= elapsed < float(outage.get("end", math.inf)):
                    self.counters["outage_" + str(outage.get("mode", "500"))] += 1
                    return str(outage.get("mode", "500"))
            rate = float(self.config.get("error_rate") or 0)
            if rate and self._rng.random() < rate:
                self.counters["errors_injected"] += 1
                return "500"
        return None

    def at_capacity(self, provider: str, now: float) -> bool:
        """True when a new call would exceed ``max_concurrent`` for ``provider``."""
        cap = self.config.get("max_concurrent")
        if isinstance(cap, dict):
            cap = cap.get(provider)
        if cap is None:
            return False
        with self._lock:
            self._expire(now)
            active = sum(  # a call still scheduled holds no line yet
                1
                for cid in self._active
                if self.calls[cid].provider == provider
                and self.calls[cid].phase(now) != "scheduled"
            )
            if active < int(cap):
                return False
            self.counters["rejected_429"] += 1
            return True

    # -- calls -----------------------------------------------------------------------------------

    def outcome_for(self, correlation_id: str | None, number: str) -> str:
        """Outcome forced by number suffix, else drawn from the mix by hash(seed, correlation)."""
        for suffix, outcome in (self.config.get("outcomes_by_suffix") or {}).items():
            if number.endswith(str(suffix)):
                return str(outcome)
        raw_mix = self.config.get("outcome_mix") or {}
        mix: dict[str, float] = {str(k): float(v) for k, v in raw_mix.items() if float(v) > 0}
        if not mix:
            return "completed"
        point = unit_hash(self.config.get("seed", 0), correlation_id or uuid.uuid4()) * sum(
            mix.values()
        )
        for name, weight in sorted(mix.items()):
            point -= weight
            if point < 0:
                return name
        return sorted(mix)[-1]

    def _call_seconds(self, correlation_id: str | None) -> float:
        spec = self.config.get("call_seconds", 2.0)
        if isinstance(spec, list | tuple):
            lo, hi = float(spec[0]), float(spec[1])
            return lo + (hi - lo) * unit_hash(
                "duration", self.config.get("seed", 0), correlation_id
            )
        return float(spec)

    def _now(self) -> float:
        """Wall-clock time at the configured resolution (APIs keep milliseconds)."""
        step = max(float(self.config.get("clock_resolution_ms") or 1), 1.0)
        return math.floor(time.time() * 1000.0 / step) * step / 1000.0

    def create(
        self,
        provider: str,
        correlation_id: str | None,
        queue_id: str | None,
        number: str,
        request: dict[str, Any],
        *,
        features: Features | None = None,
        start_at: float | None = None,
        account_key: str | None = None,
        idempotency_key: str | None = None,
    ) -> SimCall:
        """Record a create and precompute the call's timeline (from ``start_at`` if later)."""
        now, mono = self._now(), time.monotonic()
        features = features or Features()
        outcome = self.outcome_for(correlation_id, number)
        if outcome == "voicemail" and not features.voicemail_detect:
            outcome = "completed"  # undetected: the agent talks to the box until it hangs up
        start = max(now, start_at or now)
        ring_at, answer_at, end_at = self._timeline(outcome, correlation_id, start)
        capped = False
        if answer_at is not None and features.max_seconds is not None:
            capped = end_at - answer_at > features.max_seconds
            end_at = min(end_at, answer_at + features.max_seconds)
        call = SimCall(
            id=str(uuid.uuid4()), provider=provider, correlation_id=correlation_id,
            queue_id=queue_id, number=number, created=now, outcome=outcome,
            ring_at=ring_at, answer_at=answer_at, end_at=end_at, request=request,
            scheduled_until=start if start > now else None, features=features,
            hit_max_duration=capped, account_key=account_key,
        )  # fmt: skip
        with self._lock:
            self.calls[call.id] = call
            if idempotency_key:
                self._keys[(provider, idempotency_key)] = call.id
            self.counters["total_creates"] += 1
            self.counters["creates_" + provider] += 1
            if correlation_id:
                self.creates[correlation_id] += 1
                if self.config.get("record_times", True):
                    self.create_times.setdefault(correlation_id, []).append(
                        {"monotonic": mono, "wall": now}
                    )
            if queue_id:
                self.creates_by_queue[queue_id] += 1
            if end_at > now:
                self._active.add(call.id)
                heapq.heappush(self._ends, (end_at, call.id))
        return call

    def _timeline(
        self, outcome: str, correlation_id: str | None, start: float
    ) -> tuple[float, float | None, float]:
        """(ring_at, answer_at, end_at) of a call whose dialling starts at ``start``."""
        cfg = self.config
        if cfg.get("answer_at_once"):
            answer_at = start if outcome in ANSWERED else None
            return start, answer_at, math.inf if outcome == "stuck" else start
        ring_at = start + float(cfg.get("queue_seconds", 0.1))
        ring_end = ring_at + float(cfg.get("ring_seconds", 0.5))
        if outcome not in ANSWERED:
            return ring_at, None, ring_end
        if outcome == "stuck":
            return ring_at, ring_end, math.inf
        return ring_at, ring_end, ring_end + self._call_seconds(correlation_id)

    def by_idempotency_key(self, provider: str, key: str) -> SimCall | None:
        """The call a create with this idempotency key made, if it is still known."""
        with self._lock:
            call_id = self._keys.get((provider, key))
            return self.calls.get(call_id) if call_id else None

    def rename(self, call_id: str, name: str) -> SimCall | None:
        """Vapi's PATCH /call/{id}: the name is the only field that can change."""
        with self._lock:
            call = self.calls.get(call_id)
            if call is not None:
                call.request["name"] = name
                call.updated = self._now()
            return call

    def get(self, call_id: str) -> SimCall | None:
        """The call with this id, if any."""
        with self._lock:
            return self.calls.get(call_id)

    def list(self, provider: str) -> list[SimCall]:
        """All calls of one provider, newest first (equal timestamps in no meaningful order)."""
        with self._lock:
            calls = [c for c in self.calls.values() if c.provider == provider]
        return sorted(calls, key=lambda c: (c.created, c.id), reverse=True)

    def cancel(self, call_id: str) -> SimCall | None:
        """End a live call now (outcome ``canceled``); None if unknown or already ended."""
        now = time.time()
        with self._lock:
            call = self.calls.get(call_id)
            if call is None or call.end_at <= now:
                return None
            call.canceled = True
            call.end_at = now
            self._active.discard(call_id)
            return call

    def delete(self, call_id: str) -> SimCall | None:
        """Forget a call (Vapi's DELETE /call/{id})."""
        with self._lock:
            self._active.discard(call_id)
            return self.calls.pop(call_id, None)

    def _expire(self, now: float) -> None:
        while self._ends and self._ends[0][0] <= now:
            _, call_id = heapq.heappop(self._ends)
            call = self.calls.get(call_id)
            if call is None or call.end_at <= now:
                self._active.discard(call_id)

    def count(self, name: str) -> None:
        """Increment a counter shown under ``counters`` in the stats."""
        with self._lock:
            self.counters[name] += 1

    def stats(self, *, times: bool = False) -> dict[str, Any]:
        """Counters for ``GET /_sim/stats``."""
        now = time.time()
        with self._lock:
            self._expire(now)
            out: dict[str, Any] = {
                "creates": dict(self.creates),
                "creates_by_queue": dict(self.creates_by_queue),
                "total_creates": self.counters["total_creates"],
                "active": len(self._active),
                "counters": dict(self.counters),
            }
            if times:
                out["create_times"] = copy.deepcopy(self.create_times)
        return out
