"""Celery tasks. Each is thin: load by id, ask ``dispatch``, call a provider, persist, enqueue.

Arguments are ids and small counters only: they show up in Flower and in broker dumps.

    poll        claim due calls, assign providers, enqueue one dispatch per call
    dispatch    gate (mark_call_dialing), create the call at the provider, enqueue track
    track       poll the provider until the call ends, then complete or fail it
    reconcile   after an outcome-unknown create: look the call up before anything is re-sent
    webhook     a provider said something changed: track once, now
    health_check, reap, rollover   maintenance on beat
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any
from uuid import UUID

from dispatch.policy import (
    PROVIDER_ERROR,
    Complete,
    Fail,
    KeepPolling,
    Reconcile,
    decide_error,
    decide_outcome,
    decide_pre_send_error,
    next_poll_delay,
)
from dispatch.request import build_call_request
from models.queries import touch_poll
from providers.base import CallStatus, Provider
from providers.errors import ConfigError, ProviderError
from worker import logs, runtime
from worker.celery_app import app
from worker.settings import get_settings

log = logs.get_logger("callq.worker")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@app.task(name="callq.poll", ignore_result=True)
def poll() -> int:
    """Claim due calls in batches; place the first chunk here, send the rest as chunks of ids.

    Placing the first chunk in this task saves a broker round trip for every small claim (the
    common case when calls trickle in one by one); larger claims are spread over the fleet.
    """
    s = get_settings()
    db = runtime.database()
    ids: list[str] = []
    for _ in range(s.claim_max_batches):
        assigned = db.claim_and_assign(s.claim_batch_size, WORKER_ID, s.lease_seconds)
        ids += [str(item.assignment_id) for item in assigned]
        if len(assigned) < s.claim_batch_size:
            break
    if not ids:
        return 0
    chunk = s.dispatch_chunk_size
    for start in range(chunk, len(ids), chunk):
        dispatch_batch.apply_async((ids[start : start + chunk],))
    log.info("calls.assigned", count=len(ids))
    _dispatch_chunk(ids[:chunk])
    return len(ids)


@app.task(name="callq.dispatch_batch", ignore_result=True)
def dispatch_batch(assignment_ids: list[str]) -> dict[str, int]:
    """Place a chunk of assigned calls concurrently; each goes through the same gate."""
    return _dispatch_chunk(assignment_ids)


# A placed call to poll next: (assignment id, poll token, seconds from now).
NextPoll = tuple[str, int, float]


def _dispatch_chunk(assignment_ids: list[str]) -> dict[str, int]:
    """Place calls concurrently, then schedule their first polls as one message."""
    polls: list[NextPoll] = []
    results: dict[str, int] = {}
    for result in runtime.executor().map(lambda a: _dispatch_bound(a, polls), assignment_ids):
        results[result] = results.get(result, 0) + 1
    _send_polls(polls)
    return results


def _dispatch_bound(assignment_id: str, polls: list[NextPoll]) -> str:
    logs.bind(assignment_id=assignment_id)
    try:
        return _dispatch_one(assignment_id, polls)
    finally:
        logs.clear()


def _send_polls(polls: list[NextPoll], chunk: int = 100) -> None:
    """One ``track_batch`` message per distinct delay (and per ``chunk`` calls)."""
    by_delay: dict[float, list[list[Any]]] = {}
    for assignment_id, token, delay in polls:
        by_delay.setdefault(round(delay, 1), []).append([assignment_id, token])
    for delay, items in by_delay.items():
        for start in range(0, len(items), chunk):
            track_batch.apply_async((items[start : start + chunk],), countdown=delay)


@app.task(name="callq.dispatch", ignore_result=True)
def dispatch(assignment_id: str) -> str:
    """Place one assigned call. A second delivery of the same task dials no one."""
    polls: list[NextPoll] = []
    result = _dispatch_one(assignment_id, polls)
    _send_polls(polls)
    return result


def _dispatch_one(assignment_id: str, polls: list[NextPoll]) -> str:
    db = runtime.database()
    call = db.gate_and_load(assignment_id)
    if call is None:
        log.info("call.dispatch_skipped", reason="gate_closed")
        return "skipped"
    logs.bind(queue_id=call["queue_id"], provider=call["provider_name"])
    try:
        provider = runtime.provider_for(call)
        request = build_call_request(call)
    except Exception as exc:
        return _before_create_error(assignment_id, exc)
    try:
        handle = provider.create_call(request)
    except ProviderError as exc:
        return _after_create_error(assignment_id, call["provider_id"], exc)
    except ConfigError as exc:  # raised before the request is built: nothing left
        return _before_create_error(assignment_id, exc)
    except Exception:
        # Anything unexpected after the gate: the request may have left, so treat the outcome
        # as unknown and look the call up before anything is re-sent.
        log.exception("call.create_crashed")
        reconcile.apply_async((assignment_id, 0), countdown=get_settings().reconcile_delay_seconds)
        return "reconcile"
    db.mark_placed(assignment_id, handle.provider_call_id)
    log.info("call.placed")
    # mark_call_placed starts the poll counter at 0: the first poll holds token 0.
    polls.append((assignment_id, 0, get_settings().track_initial_delay_seconds))
    return "placed"


def _before_create_error(assignment_id: str, exc: Exception) -> str:
    """No request left: fail the call over with a reason that names no value."""
    decision = decide_pre_send_error(exc)
    result = _fail(assignment_id, decision)
    log.warning("call.not_sent", kind=decision.kind, result=result, error=decision.error)
    return result


def _after_create_error(assignment_id: str, provider_id: UUID, exc: ProviderError) -> str:
    decision = decide_error(exc)
    if isinstance(decision, Reconcile):
        log.warning("call.create_outcome_unknown", error=str(exc))
        # Count it against the provider's health so a failing provider's circuit opens and new
        # calls go elsewhere while this one waits for proof either way.
        runtime.database().record_health(provider_id, False, 0.0, "create_unknown")
        reconcile.apply_async((assignment_id, 0), countdown=get_settings().reconcile_delay_seconds)
        return "reconcile"
    result = _fail(assignment_id, decision)
    log.warning("call.create_failed", kind=decision.kind, result=result, error=str(exc))
    return result


@app.task(name="callq.track", ignore_result=True)
def track(assignment_id: str, poll_count: int | None = 0) -> str:
    """Poll a placed call; ``poll_count`` None is a one-off check (webhook) outside the chain."""
    polls: list[NextPoll] = []
    result = _track_one(assignment_id, poll_count, polls)
    _send_polls(polls)
    return result


@app.task(name="callq.track_batch", ignore_result=True)
def track_batch(items: list[list[Any]]) -> dict[str, int]:
    """Poll several placed calls ([assignment id, poll token] each) concurrently."""
    polls: list[NextPoll] = []
    results: dict[str, int] = {}

    def one(item: list[Any]) -> str:
        logs.bind(assignment_id=item[0])
        try:
            return _track_one(str(item[0]), int(item[1]), polls)
        finally:
            logs.clear()

    for result in runtime.executor().map(one, items):
        results[result] = results.get(result, 0) + 1
    _send_polls(polls)
    return results


def _track_one(assignment_id: str, poll_count: int | None, polls: list[NextPoll]) -> str:
    db = runtime.database()
    call = db.load_call(assignment_id)
    if call is None or call["state"] != "placed":
        return "not_placed"
    logs.bind(queue_id=call["queue_id"], provider=call["provider_name"])
    provider = runtime.provider_for(call)
    try:
        status = provider.get_call(str(call["provider_call_id"]))
    except ProviderError as exc:
        log.warning("call.poll_failed", error=str(exc))
        return _continue_tracking(assignment_id, poll_count, polls)
    decision = decide_outcome(status)
    if isinstance(decision, KeepPolling):
        return _continue_tracking(assignment_id, poll_count, polls)
    return _finish(assignment_id, status, decision)


def _finish(assignment_id: str, status: CallStatus, decision: Complete | Fail) -> str:
    db = runtime.database()
    if isinstance(decision, Complete):
        db.complete(
            assignment_id,
            duration_seconds=status.duration_seconds,
            recording_url=status.recording_url,
            transcript=status.transcript,
            cost=status.cost,
            provider_call_id=status.provider_call_id,
            started_at=status.started_at,
            ended_at=status.ended_at,
        )
        log.info("call.completed", duration_seconds=status.duration_seconds)
        return "completed"
    result = db.fail(
        assignment_id,
        decision.kind,
        decision.error,
        duration_seconds=status.duration_seconds,
        provider_call_id=status.provider_call_id,
    )
    log.info("call.ended_unanswered", kind=decision.kind, result=result)
    return result


def _continue_tracking(assignment_id: str, poll_count: int | None, polls: list[NextPoll]) -> str:
    if poll_count is None:
        return "checked"
    s = get_settings()
    delay = next_poll_delay(
        poll_count + 1,
        s.track_initial_delay_seconds,
        s.track_backoff_factor,
        s.track_max_delay_seconds,
    )
    return _schedule_track(assignment_id, poll_count, polls, delay)


def _schedule_track(
    assignment_id: str, poll_count: int, polls: list[NextPoll], delay: float | None = None
) -> str:
    """Advance the poll token and queue the next poll; a stale chain stops here."""
    if delay is None:
        delay = get_settings().track_initial_delay_seconds
    token = touch_poll(runtime.database(), assignment_id, poll_count, delay)
    if token is None:
        return "superseded"
    polls.append((assignment_id, token, delay))
    return "tracking"


@app.task(name="callq.reconcile", ignore_result=True)
def reconcile(assignment_id: str, lookup: int = 0) -> str:
    """Find a call whose create had an unknown outcome; re-send only when it is not there."""
    s = get_settings()
    db = runtime.database()
    call = db.load_call(assignment_id)
    if call is None or call["state"] != "dialing":
        return "not_dialing"
    logs.bind(queue_id=call["queue_id"], provider=call["provider_name"])
    provider = runtime.provider_for(call)
    since = call["dialing_at"] - timedelta(minutes=2)
    try:
        found = provider.find_call(build_call_request(call), since)
    except ProviderError as exc:
        log.warning("call.reconcile_lookup_failed", error=str(exc))
        found = None
        if lookup + 1 >= s.reconcile_lookups:
            # The provider cannot tell us: keep asking rather than risk a second dial.
            reconcile.apply_async((assignment_id, lookup), countdown=s.track_max_delay_seconds)
            return "lookup_failed"
    if found is not None:
        db.mark_placed(assignment_id, found.provider_call_id)
        log.info("call.reconciled", found=True)
        polls: list[NextPoll] = []
        _schedule_track(assignment_id, 0, polls, 0)
        _send_polls(polls)
        return "found"
    if lookup + 1 < s.reconcile_lookups:
        reconcile.apply_async((assignment_id, lookup + 1), countdown=s.reconcile_delay_seconds)
        return "retry_lookup"
    result = db.fail(assignment_id, PROVIDER_ERROR, "create outcome unknown; not found at provider")
    log.warning("call.reconciled", found=False, result=result)
    return result


@app.task(name="callq.webhook", ignore_result=True)
def webhook(provider_id: str, provider_call_id: str) -> str:
    """A provider reported a change: re-read the call from its API (the source of truth)."""
    assignment_id = runtime.database().assignment_for_provider_call(provider_id, provider_call_id)
    if assignment_id is None:
        return "unknown_call"
    return str(track(str(assignment_id), None))


@app.task(name="callq.health_check", ignore_result=True)
def health_check() -> dict[str, str]:
    """Probe every active provider and record status, latency and failures."""
    db = runtime.database()
    results: dict[str, str] = {}
    for row in db.active_providers():
        try:
            # A row the worker refuses (host, secret name) is never sent anything.
            provider: Provider = runtime.provider_for(row)
            health = provider.check_health()
            ok, latency, detail = health.ok, health.latency_ms, health.detail
        except ConfigError:
            ok, latency, detail = False, 0.0, "config_error"
        except Exception as exc:  # a probe must never kill the maintenance queue
            ok, latency, detail = False, 0.0, type(exc).__name__
        results[str(row["provider_id"])] = db.record_health(
            row["provider_id"], ok, latency, None if ok else detail
        )
    return results


@app.task(name="callq.reap", ignore_result=True)
def reap() -> dict[str, int]:
    """Give back expired claims, restart lost tracking, fix slot counts."""
    db = runtime.database()
    counts: dict[str, int] = {}
    for row in db.reap():
        counts[row.action] = counts.get(row.action, 0) + 1
        if row.action == "reconcile" and row.assignment_id is not None:
            _resume(row.assignment_id)
    counts["slots_fixed"] = db.reconcile_slots()
    if any(counts.values()):
        log.info("leases.reaped", **counts)
    return counts


def _resume(assignment_id: UUID) -> None:
    call = runtime.database().load_call(assignment_id)
    if call is None:
        return
    if call["state"] == "dialing":
        reconcile.apply_async((str(assignment_id), 0))
    elif call["state"] == "placed":
        track.apply_async((str(assignment_id), int(call["poll_count"])))


@app.task(name="callq.rollover", ignore_result=True)
def rollover() -> int:
    """Open the next usage period for subscriptions whose period ended."""
    return runtime.database().rollover()


@app.task(name="callq.noop", ignore_result=True)
def noop() -> None:
    """Does nothing: the benchmark's measure of the engine's own limit."""


def _fail(assignment_id: str, decision: Fail) -> str:
    return runtime.database().fail(
        assignment_id,
        decision.kind,
        decision.error,
        retry_after_seconds=decision.retry_after_seconds,
    )
