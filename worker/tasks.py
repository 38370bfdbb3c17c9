"""Celery tasks. Each is thin: load by id, ask ``dispatch``, call a provider, persist, enqueue.

Arguments are ids and small counters only: they show up in Flower and in broker dumps.

    poll            claim a batch of due calls and assign providers; place the first chunk, send
                    the rest (and the next poll when the batch was full)
    dispatch_batch  per call: pass the gate (mark_call_dialing), create it at the provider
    track_due       beat's tick: poll the placed calls whose next poll is due (track_batch: more)
    reconcile       after an outcome-unknown create: look the call up before anything is re-sent
    webhook         a provider said something changed: check the call once, now
    health_check, reap, rollover, prune_events   maintenance on beat
    notify_drain, notify_deliver   signed call.ended events to the apps (queue "notify")

Each per-call step returns a ``dispatch.steps`` value (placed, polling, reconciling, ended,
skipped); the task that ran the steps sends what comes next (a reconcile; a poll's time is
the call's ``next_poll_at``, read by the tick) and returns the count of each step's label.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg

from dispatch.policy import (
    PROVIDER_ERROR,
    Complete,
    Fail,
    KeepPolling,
    Reconcile,
    Release,
    decide_error,
    decide_outcome,
    decide_setup_error,
    decide_unproven_match,
    next_poll_delay,
    safety_net_delay,
)
from dispatch.request import build_call_request
from dispatch.steps import (
    Ended,
    NextPoll,
    Outcome,
    Placed,
    Polling,
    Reconciling,
    Skipped,
    SkipReason,
    Step,
    tally,
)
from models.calls import AssignmentState, CallRow
from models.queries import Claim
from providers.base import CallHandle, CallState, CallStatus, WebhookEvent, clamp_status
from providers.errors import ConfigError, ProviderError, ProviderUnprovenMatchError
from worker import logs, notify, runtime
from worker.celery_app import app
from worker.celery_config import WORK_PRIORITY
from worker.settings import get_settings

log = logs.get_logger("callq.worker")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
POLL_CHUNK = 100  # placed calls polled by one task


@app.task(name="callq.poll", ignore_result=True)
def poll(batch: int = 0, hand_off: bool = False) -> int:
    """Claim one batch of due calls; place its first chunk here, send the rest as chunks of ids.

    A full batch sends the next poll (up to ``claim_max_batches`` in a row) behind its own
    chunks, so a backlog is claimed only as fast as the fleet places it and the dispatch queue
    stays about one batch deep. A poll from beat or a NOTIFY goes before waiting chunks (message
    priority, worker/celery_config.py), and the claim takes each tenant's first due calls first
    (fair share): a newcomer's call claimed while a backlog drains lands in the first chunk of
    its batch, which its poll places at once on the fresh lane. Placing the first chunk in this
    task also saves a broker round trip for every small claim (calls that trickle in one by
    one), and a claim that fits in one chunk passes its calls' gates in its own statement
    (``claim_and_gate_calls``): a lone call is claimed, gated and placed in two statements.

    ``hand_off``: the worker's LISTEN thread claims in process (worker/celery_app.py) and hands
    the first chunk to the "listen" lane, so it can claim the next notification's calls while
    these are being placed. While calls it handed off are still being placed, it claims only
    ``listen_busy_batch_size`` calls: enough for each newcomer's first call, not another slice
    of the backlog (which its chained polls claim).
    """
    s = get_settings()
    chunk = s.dispatch_chunk_size
    # While the listener's earlier calls are still being placed, a wake-up claims a small batch:
    # the fair order fills it with each waiting tenant's first calls, and the backlog that keeps
    # the lane busy is claimed by its own chained polls, only as fast as the fleet places it.
    busy = hand_off and runtime.pending("listen") > 0
    limit = min(s.listen_busy_batch_size, s.claim_batch_size) if busy else s.claim_batch_size
    claim = runtime.database().claim_and_gate(limit, WORKER_ID, s.lease_seconds, gate=chunk)
    ids = [str(item.assignment_id) for item in claim.assigned]
    if not ids:
        return 0
    if len(ids) >= s.claim_batch_size and batch + 1 < s.claim_max_batches:
        # behind this batch's chunks (not a poll's priority): the next batch is claimed when
        # these are being placed, so claims run only as far ahead as the fleet dials
        poll.apply_async((batch + 1,), priority=WORK_PRIORITY)
    for start in range(chunk, len(ids), chunk):
        dispatch_batch.apply_async((ids[start : start + chunk],))
    log.info("calls.assigned", count=len(ids))
    if hand_off:
        runtime.submit("listen", _place_handed_off, claim, ids[:chunk])
    else:
        _place_fresh(claim, ids[:chunk])
    return len(ids)


def _place_fresh(claim: Claim, assignment_ids: list[str]) -> None:
    """Place the chunk a claim took first (the calls whose gates the claim passed itself, else
    through their gates); the fresh calls' creates do not queue behind the backlog's (their own
    pool of threads)."""
    if claim.gated:
        steps = _gate_refused(len(claim.refused)) + place_won(claim.won, lane="fresh")
    else:
        steps = dispatch_chunk(assignment_ids, lane="fresh")
    _send_next(steps)


def _place_handed_off(claim: Claim, assignment_ids: list[str]) -> None:
    """``_place_fresh`` off the claiming thread. What an error leaves unplaced keeps its claim
    lease, and the reaper gives it back (as after a poll task that failed)."""
    try:
        _place_fresh(claim, assignment_ids)
    except Exception as exc:
        log.warning("calls.placement_failed", count=len(assignment_ids), error=type(exc).__name__)


@app.task(name="callq.dispatch_batch", ignore_result=True)
def dispatch_batch(assignment_ids: list[str]) -> dict[str, int]:
    """Place a chunk of assigned calls concurrently; each goes through the same gate."""
    steps = dispatch_chunk(assignment_ids)
    _send_next(steps)
    return tally(steps)


@app.task(name="callq.dispatch", ignore_result=True)
def dispatch(assignment_id: str) -> str:
    """Place one assigned call. A second delivery of the same task dials no one."""
    return _then(dispatch_chunk([assignment_id])[0])


@app.task(name="callq.track_batch", ignore_result=True)
def track_batch(items: list[list[Any]]) -> dict[str, int]:
    """Poll several placed calls ([assignment id, poll token] each) concurrently."""
    steps = track_chunk([(str(item[0]), int(item[1])) for item in items])
    _send_next(steps)
    return tally(steps)


@app.task(name="callq.track_due", ignore_result=True)
def track_due(hand_back: bool = False) -> dict[str, int]:
    """Beat's tracking tick: poll the placed calls whose next poll is due (a column, not a
    countdown), the first chunk here and the rest as ``track_batch`` messages. Calls that
    trickle in cost no more per poll than calls that come together.

    ``hand_back``: the leading worker's tracker runs this in process (worker/celery_app.py),
    where a failure is only a log line; a chunk that fails there is sent on as a
    ``track_batch`` message (same poll tokens), so a failure that persists is a failed task in
    Flower, as it is when beat's message runs the tick.
    """
    s = get_settings()
    defer = s.track_defer_seconds if runtime.is_placing() else 0.0
    db = runtime.database()
    # the chunk polled here, taken and loaded in one statement; a full chunk: the rest as ids
    calls = db.take_due_calls(min(s.track_tick_limit, POLL_CHUNK), defer)
    left = s.track_tick_limit - len(calls)
    rest = db.take_due_polls(left, defer) if len(calls) == POLL_CHUNK and left > 0 else []
    for start in range(0, len(rest), POLL_CHUNK):
        track_batch.apply_async(([list(item) for item in rest[start : start + POLL_CHUNK]],))
    items = [(str(call.assignment_id), call.poll_count) for call in calls]
    try:
        steps = _track_loaded(items, {str(call.assignment_id): call for call in calls})
    except Exception:
        if hand_back and items:
            track_batch.apply_async(([list(item) for item in items],))
        raise
    _send_next(steps)
    return tally(steps)


@app.task(name="callq.reconcile", ignore_result=True)
def reconcile(assignment_id: str, lookup: int = 0) -> str:
    """Find a call whose create had an unknown outcome; re-send only when it is not there."""
    return _then(reconcile_one(assignment_id, lookup))


@app.task(name="callq.webhook", ignore_result=True)
def webhook(items: list[list[str]]) -> dict[str, int]:
    """Providers reported changes ([provider id, provider call id] each, one message for a
    batch of deliveries): re-read each call from its provider's API (the source of truth)."""
    steps = check_reported([(str(p), str(c)) for p, c in items])
    _send_next(steps)
    return tally(steps)


def check_reported(items: Sequence[tuple[str, str]]) -> list[Step]:
    """Poll once, outside the polling chain, each call a provider reported on."""
    found = runtime.database().assignments_for_provider_calls(items)
    unique = list(dict.fromkeys(items))
    steps: list[Step] = [Skipped(SkipReason.UNKNOWN_CALL) for item in unique if item not in found]
    return steps + track_chunk([(str(found[item]), None) for item in unique if item in found])


def end_from_reports(reports: Sequence[tuple[str, WebhookEvent]]) -> list[Step]:
    """End calls from their providers' final reports (trusted webhooks) without reading them
    again: one look-up for the batch, the endings a few at a time (the "end" lane).

    Runs in the webhook server: the reports' data (transcript, recording) never goes through
    the broker. A report for a call that already ended changes nothing.
    """
    keys = [(provider_id, event.provider_call_id) for provider_id, event in reports]
    found = runtime.database().assignments_for_provider_calls(keys)
    items = [(found.get(key), event) for key, (_, event) in zip(keys, reports, strict=True)]
    return runtime.map_in_context(_end_reported, items, "end")


def _end_reported(item: tuple[UUID | None, WebhookEvent]) -> Step:
    assignment_id, event = item
    if assignment_id is None:
        return Skipped(SkipReason.UNKNOWN_CALL)
    decision = decide_outcome(event.status)
    if isinstance(decision, KeepPolling):
        return Skipped(SkipReason.CHECKED)
    logs.bind(assignment_id=str(assignment_id))
    return _finish(str(assignment_id), event.status, decision)


# -- running steps and sending what comes next ---------------------------------------------------


def _then(step: Step) -> str:
    """Send the follow-up of one step; its label is the task's result."""
    _send_next([step])
    return step.label


def _send_next(steps: Sequence[Step]) -> None:
    """Send a reconcile for each unknown outcome. Polls need no message: each placed call's
    next poll is its ``next_poll_at``, which beat's tracking tick reads."""
    for step in steps:
        if isinstance(step, Reconciling):
            reconcile.apply_async((step.assignment_id, step.lookup), countdown=step.delay)


# -- the per-call steps ----------------------------------------------------------------------------


def dispatch_chunk(assignment_ids: Sequence[str], lane: str = "dispatch") -> list[Step]:
    """Place a chunk of assigned calls: the gates in one statement, the creates concurrently,
    the record of the placed calls in one statement. A call whose gate another task won (a
    duplicate delivery, a released assignment) is skipped: nobody is dialed twice."""
    with runtime.placing(len(assignment_ids)):
        calls = runtime.database().gate_and_load(assignment_ids)  # in the chunk's order
        won = {str(call.assignment_id) for call in calls}
        return _gate_refused(sum(a not in won for a in assignment_ids)) + _place(calls, lane)


def _gate_refused(count: int) -> list[Step]:
    """The steps of calls whose gate was closed to this task (logged once for the chunk)."""
    if count:
        log.info("calls.dispatch_skipped", reason=SkipReason.GATE_CLOSED, count=count)
    return [Skipped(SkipReason.GATE_CLOSED)] * count


def place_won(calls: Sequence[CallRow], lane: str = "dispatch") -> list[Step]:
    """Create calls whose gates were won, concurrently, and record the placed ones and their
    first polls in one statement."""
    with runtime.placing(len(calls)):
        return _place(calls, lane)


def _place(calls: Sequence[CallRow], lane: str) -> list[Step]:
    """``place_won``'s body (its caller marks the placement in flight)."""
    db = runtime.database()
    steps: list[Step] = []
    created = runtime.map_in_context(_create, calls, lane)
    # the placed calls' provider ids and first polls, recorded in one statement
    placed = {
        str(call.assignment_id): (result.provider_call_id, _poll_delay(call, 0))
        for call, result in zip(calls, created, strict=True)
        if isinstance(result, CallHandle)
    }
    tokens = db.mark_placed(placed)
    for call, result in zip(calls, created, strict=True):
        assignment_id = str(call.assignment_id)
        if isinstance(result, CallHandle):
            log.info("call.placed", **_ids(call))
            token = tokens.get(assignment_id, 0)
            steps.append(Placed(NextPoll(assignment_id, token, placed[assignment_id][1])))
        else:
            steps.append(result)
    return steps


def _create(call: CallRow) -> CallHandle | Step:
    """Send one call's create; what went wrong, as the step that follows, when it failed."""
    logs.bind(**_ids(call))
    try:
        provider = runtime.provider_for(call.provider)
        request = build_call_request(call)
    except Exception as exc:  # nothing has been sent yet: fail over, never reconcile
        log.warning("call.setup_failed", error=type(exc).__name__)
        return _end(str(call.assignment_id), decide_setup_error(exc))
    deferred = _pace(call)
    if deferred is not None:
        return deferred
    try:
        return provider.create_call(request)
    except ProviderError as exc:
        return _after_create_error(call, exc)
    except ConfigError as exc:  # raised before a request is built (e.g. a setting missing)
        log.warning("call.setup_failed", error=type(exc).__name__)
        return _end(str(call.assignment_id), decide_setup_error(exc))
    except Exception as exc:
        # Anything unexpected while sending: the request may have left, so treat the outcome
        # as unknown and look the call up before anything is re-sent. Logged by type only: an
        # exception's text may carry what was sent.
        log.warning("call.create_crashed", error=type(exc).__name__)
        return Reconciling(str(call.assignment_id), 0, get_settings().reconcile_delay_seconds)


def _pace(call: CallRow) -> Step | None:
    """Wait for this create's slot in the provider's fleet-wide schedule (PostgreSQL, shared by
    every worker). The wait stays well inside the dialing lease, so the reaper never reconciles
    a call that is only waiting; without a slot in time the call goes back to the queue."""
    if not call.paced:
        return None
    s = get_settings()
    bound = min(
        30.0, s.lease_seconds - s.http_connect_timeout_seconds - s.http_read_timeout_seconds - 2.0
    )
    db = runtime.database()
    wait = db.reserve_create(call.provider.provider_id, max(bound, 0.0))
    if wait is None:
        db.defer_dial(call.assignment_id, max(bound, 1.0))
        log.info("call.rate_deferred", **_ids(call))
        return Skipped(SkipReason.RATE_DEFERRED)
    if wait > 0:
        time.sleep(wait)
    return None


def _after_create_error(call: CallRow, exc: ProviderError) -> Step:
    decision = decide_error(exc)
    assignment_id = str(call.assignment_id)
    if isinstance(decision, Reconcile):
        log.warning("call.create_outcome_unknown", error=str(exc))
        # Count it against the provider's health so a failing provider's circuit opens and new
        # calls go elsewhere while this one waits for proof either way.
        runtime.database().record_health(call.provider.provider_id, False, 0.0, "create_unknown")
        return Reconciling(assignment_id, 0, get_settings().reconcile_delay_seconds)
    if isinstance(decision, Release):
        runtime.database().release(assignment_id, decision.reason, decision.delay_seconds)
        log.info("call.released", reason=decision.reason, delay=decision.delay_seconds)
        return Ended(Outcome.RELEASED)
    step = _end(assignment_id, decision)
    log.warning("call.create_failed", kind=decision.kind, result=step.label, error=str(exc))
    return step


def track_chunk(items: Sequence[tuple[str, int | None]]) -> list[Step]:
    """Poll placed calls ((assignment id, poll token) each): the loads in one statement, the
    provider reads concurrently, the poll tokens of the calls still going in one statement.
    A token of None is a one-off check (a webhook) outside the polling chain."""
    return _track_loaded(items, runtime.database().load_calls([a for a, _ in items]))


def _track_loaded(items: Sequence[tuple[str, int | None]], calls: dict[str, CallRow]) -> list[Step]:
    """``track_chunk`` with its calls loaded (by assignment id; a missing one is not placed)."""
    live = [c for c in calls.values() if c.state is AssignmentState.PLACED]
    steps: list[Step] = [Skipped(SkipReason.NOT_PLACED)] * (len(items) - len(live))
    results = runtime.map_in_context(_poll, live, "track")
    polled = [step for step, _ in results]
    observed = [
        (str(c.assignment_id), kind)
        for c, (step, kind) in zip(live, results, strict=True)
        if step is None and kind is not None
    ]
    if observed:
        _record_provider_states(observed)
    going = {str(c.assignment_id) for c, step in zip(live, polled, strict=True) if step is None}
    steps += [step for step in polled if step is not None]
    again = [
        (a, t, 0.0 if t is None else _poll_delay(calls[a], t + 1)) for a, t in items if a in going
    ]
    return steps + _poll_again(again)


# Provider states of a call still going that the event log records (once per attempt).
_LOGGED_STATES = frozenset({CallState.RINGING, CallState.IN_PROGRESS})


def _poll(call: CallRow) -> tuple[Step | None, str | None]:
    """Read one call's state at its provider: the step that ended it (or None if it goes on),
    and the provider state to log if it goes on ringing or in progress."""
    logs.bind(**_ids(call))
    try:
        status = runtime.provider_for(call.provider).get_call(str(call.provider_call_id))
    except ProviderError as exc:
        log.warning("call.poll_failed", error=str(exc))
        return None, None
    decision = decide_outcome(status)
    if isinstance(decision, KeepPolling):
        return None, (str(status.state) if status.state in _LOGGED_STATES else None)
    return _finish(str(call.assignment_id), status, decision), None


def _record_provider_states(observed: Sequence[tuple[str, str]]) -> None:
    """Log ringing / in progress once per attempt; the log is not worth a lost poll."""
    try:
        runtime.database().record_provider_states(observed)
    except psycopg.Error as exc:
        log.warning("call.event_not_logged", sqlstate=exc.sqlstate)


def _poll_again(items: Sequence[tuple[str, int | None, float]]) -> list[Step]:
    """Advance the poll tokens and say when to poll next; a stale chain stops here."""
    steps: list[Step] = [Skipped(SkipReason.CHECKED) for _, token, _ in items if token is None]
    polls = [(a, token, delay) for a, token, delay in items if token is not None]
    advanced = runtime.database().touch_polls(polls)
    for assignment_id, _, delay in polls:
        token = advanced.get(assignment_id)
        if token is None:
            steps.append(Skipped(SkipReason.SUPERSEDED))
        else:
            steps.append(Polling(NextPoll(assignment_id, token, delay)))
    return steps


def _poll_delay(call: CallRow, polls_done: int) -> float:
    """Seconds until the next poll: a growing interval, or the safety net's when the provider
    tells us a call's end by webhook."""
    s = get_settings()
    if runtime.expects_webhooks(call.provider):
        return safety_net_delay(s.track_webhook_delay_seconds, random.random())
    return next_poll_delay(
        polls_done, s.track_initial_delay_seconds, s.track_backoff_factor, s.track_max_delay_seconds
    )


def _finish(assignment_id: str, status: CallStatus, decision: Complete | Fail) -> Step:
    status = clamp_status(status)  # plug-in adapters too: only data the database accepts
    if isinstance(decision, Fail):
        step = _end(
            assignment_id,
            decision,
            duration_seconds=status.duration_seconds,
            provider_call_id=status.provider_call_id,
        )
        log.info("call.ended_unanswered", kind=decision.kind, result=step.label)
        return step
    try:
        _complete(assignment_id, status)
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
        # Provider data the clamp let through and a constraint refused: end the call anyway,
        # without that data, rather than leave it placed (and re-tracked) forever.
        log.warning("call.provider_data_refused", sqlstate=exc.sqlstate)
        _complete(assignment_id, CallStatus(status.provider_call_id, status.state))
    log.info("call.completed", duration_seconds=status.duration_seconds)
    return Ended(Outcome.COMPLETED)


def _complete(assignment_id: str, status: CallStatus) -> None:
    runtime.database().complete(
        assignment_id,
        duration_seconds=status.duration_seconds,
        recording_url=status.recording_url,
        transcript=status.transcript,
        cost=status.cost,
        provider_call_id=status.provider_call_id,
        started_at=status.started_at,
        ended_at=status.ended_at,
    )


def reconcile_one(assignment_id: str, lookup: int) -> Step:
    """Look up a call whose create had an unknown outcome (lookup number ``lookup``)."""
    s = get_settings()
    db = runtime.database()
    call = db.load_call(assignment_id)
    if call is None or call.state is not AssignmentState.DIALING:
        return Skipped(SkipReason.NOT_DIALING)
    logs.bind(**_ids(call))
    last = lookup + 1 >= s.reconcile_lookups
    since = (call.dialing_at or datetime.now(UTC)) - timedelta(minutes=2)
    try:
        found = runtime.provider_for(call.provider).find_call(build_call_request(call), since)
    except ProviderUnprovenMatchError:
        # A call that may be ours, or another tenant's: adopt nothing, dial nothing again.
        log.warning("call.reconcile_unproven", last=last)
        if last:
            return _end(assignment_id, decide_unproven_match())
        return Reconciling(assignment_id, lookup + 1, s.reconcile_delay_seconds)
    except ProviderError as exc:
        log.warning("call.reconcile_lookup_failed", error=str(exc))
        if last:  # the provider cannot tell us: keep asking rather than risk a second dial
            return Reconciling(assignment_id, lookup, s.track_max_delay_seconds)
        found = None
    if found is not None:
        token = db.mark_placed({assignment_id: (found.provider_call_id, 0.0)}).get(assignment_id, 0)
        log.info("call.reconciled", found=True)
        return Placed(NextPoll(assignment_id, token, 0.0))
    if not last:
        return Reconciling(assignment_id, lookup + 1, s.reconcile_delay_seconds)
    step = _end(assignment_id, Fail(PROVIDER_ERROR, "create outcome unknown; not found"))
    log.warning("call.reconciled", found=False, result=step.label)
    return step


def _end(
    assignment_id: str,
    decision: Fail,
    *,
    duration_seconds: float | None = None,
    provider_call_id: str | None = None,
) -> Ended:
    """Hand the call to handle_failed_call with the decision's kind."""
    result = runtime.database().fail(
        assignment_id,
        decision.kind,
        decision.error,
        retry_after_seconds=decision.retry_after_seconds,
        duration_seconds=duration_seconds,
        provider_call_id=provider_call_id,
    )
    return Ended(Outcome(result))


def _ids(call: CallRow) -> dict[str, str]:
    """The ids every per-call log event carries (never a phone number or a name)."""
    return {
        "assignment_id": str(call.assignment_id),
        "queue_id": str(call.queue_id),
        "provider": call.provider.name,
    }


# -- maintenance -----------------------------------------------------------------------------------


@app.task(name="callq.health_check", ignore_result=True)
def health_check() -> dict[str, str]:
    """Probe every active provider and record status, latency and failures."""
    db = runtime.database()
    results: dict[str, str] = {}
    for row in db.active_providers():
        try:
            health = runtime.provider_for(row).check_health()
            ok, latency, detail = health.ok, health.latency_ms, health.detail
        except Exception as exc:  # a probe must never kill the maintenance queue
            ok, latency, detail = False, 0.0, type(exc).__name__
        results[str(row.provider_id)] = db.record_health(
            row.provider_id, ok, latency, None if ok else detail
        )
    return results


@app.task(name="callq.reap", ignore_result=True)
def reap() -> dict[str, int]:
    """Give back expired claims, restart lost tracking, fix slot and tenant counts, close
    campaigns."""
    db = runtime.database()
    counts: dict[str, int] = {}
    for row in db.reap():
        counts[row.action] = counts.get(row.action, 0) + 1
        if row.action == "reconcile" and row.assignment_id is not None:
            _resume(row.assignment_id)
    counts["slots_fixed"] = db.reconcile_slots()
    counts["counters_fixed"] = db.reconcile_counters()
    counts["campaigns_closed"] = db.close_campaigns()
    if any(counts.values()):
        log.info("leases.reaped", **counts)
    return counts


def _resume(assignment_id: UUID) -> None:
    call = runtime.database().load_call(assignment_id)
    if call is None:
        return
    # A placed call needs nothing here: the tracking tick takes any poll that is due.
    if call.state is AssignmentState.DIALING:
        reconcile.apply_async((str(assignment_id), 0))


@app.task(name="callq.rollover", ignore_result=True)
def rollover() -> int:
    """Open the next usage period for subscriptions whose period ended."""
    return runtime.database().rollover()


@app.task(name="callq.prune_events", ignore_result=True)
def prune_events(batch: int = 10_000, max_batches: int = 50) -> int:
    """Apply the call-event log's retention, a batch per statement; the events deleted."""
    db = runtime.database()
    retention = get_settings().event_retention_days * 86400
    deleted = 0
    for _ in range(max_batches):
        n = db.prune_events(retention, batch)
        deleted += n
        if n < batch:
            break
    if deleted:
        log.info("events.pruned", deleted=deleted)
    return deleted


@app.task(name="callq.noop", ignore_result=True)
def noop() -> None:
    """Does nothing: the benchmark's measure of the engine's own limit."""


@app.task(name="callq.notify_drain", ignore_result=True)
def notify_drain() -> int:
    """Lease due notifications from the outbox and send one delivery task for each."""
    s = get_settings()
    claimed = runtime.database().claim_notifications(s.notify_batch_size, s.notify_lease_seconds)
    for notification_id, attempt in claimed:
        notify_deliver.apply_async((str(notification_id), attempt))
    return len(claimed)


@app.task(name="callq.notify_deliver", ignore_result=True)
def notify_deliver(notification_id: str, attempt: int) -> str:
    """One signed POST; the outbox records the result (retries and backoff are rows)."""
    db = runtime.database()
    delivery = db.notification_delivery(notification_id, attempt)
    if delivery is None:
        return "noop"
    s = get_settings()
    with notify.new_client(s.notify_connect_timeout_seconds, s.notify_read_timeout_seconds) as c:
        outcome = notify.deliver(
            c,
            delivery.url,
            delivery.secret,
            delivery.body,
            allow_private=s.notify_allow_private,
            allow_http=s.notify_allow_private,
        )
    result = db.record_notification(
        notification_id, attempt, outcome.ok, outcome.http_status, outcome.error
    )
    log.info(
        "notification.attempt",
        notification_id=notification_id,
        attempt=attempt,
        http_status=outcome.http_status,
        error=outcome.error,
        result=result,
    )
    return result
