"""Named SQL the worker runs, each with a purpose line and named parameters.

Most statements are thin calls of the functions in ``supabase/migrations``: the
concurrency-critical logic (claiming, slot accounting, idempotent completion) lives there. This
module names the statements and turns their rows into typed values (``models.calls``) once,
where they are read.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
from psycopg import pq
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from models.calls import AssignmentState, CallRow, ProviderRow
from models.session import connect_kwargs, libpq_url

Params = Mapping[str, Any]
# How many times a statement chosen as a deadlock's victim is run (Database._run).
DEADLOCK_ATTEMPTS = 3
POOL_MAX_IDLE_SECONDS = 7 * 24 * 3600.0  # never, in practice: see Database.__init__

# -- queries: purpose line, then the statement -------------------------------------------------

# The provider columns every provider read returns (``ProviderRow.from_row``).
PROVIDER_COLUMNS = """
p.id AS provider_id, p.name AS provider_name, p.provider_type, p.api_key, p.api_secret,
p.webhook_secret, p.base_url, p.max_concurrent_calls, p.capabilities, p.config
"""
# The template as it was when the call was queued (call_queue.template_snapshot, a copy of the
# row): a later edit or deletion of the template does not change the call.
TEMPLATE_JOIN = (
    "LEFT JOIN LATERAL jsonb_populate_record(NULL::call_templates, q.template_snapshot) t ON true"
)

# What a call's create sends, from its queue row ``q``, template ``t`` and provider ``p``.
CALL_DETAIL_COLUMNS = f"""
q.recipient_name, q.recipient_phone, q.recipient_email, q.custom_variables,
t.name AS template_name, t.script, t.first_message, t.voicemail_detection,
t.voicemail_action, t.voicemail_message, t.record_calls,
{PROVIDER_COLUMNS}
"""
# Everything a dispatch, a poll or a reconcile needs about assignment ``a`` (``CallRow``).
CALL_COLUMNS = f"""
a.id AS assignment_id, a.state, a.provider_call_id, a.dialing_at, a.attempt, a.poll_count,
q.id AS queue_id, q.status AS queue_status, {CALL_DETAIL_COLUMNS}
"""
# What CALL_COLUMNS reads beside an assignment row ``a``.
CALL_JOINS = f"""
JOIN call_queue q ON q.id = a.queue_id
JOIN call_service_providers p ON p.id = a.provider_id
{TEMPLATE_JOIN}
"""
CALL_FROM = f"FROM call_assignments a {CALL_JOINS}"

# Load the calls behind some assignments (those that exist), in one round trip.
LOAD_CALLS = f"SELECT {CALL_COLUMNS} {CALL_FROM} WHERE a.id = ANY (%(assignment_ids)s::uuid[])"

# Win the dial gate of each assignment, in the given order (callers sort the ids, so two
# statements lock queue rows in the same order), and load the calls won, in one round trip.
# The calls are read from the statement's snapshot, taken before the gates' own updates; the
# plan's terms for each dial (max duration from its minute reservation, caller id) come from
# dial_gates itself (all the calls' rules first, then the plan's gates: the tenant's rows are
# held for the second halves only).
GATE_AND_LOAD = f"""
SELECT {CALL_COLUMNS}, g.max_duration_seconds, g.caller_id, g.paced
FROM dial_gates(%(assignment_ids)s::uuid[]) WITH ORDINALITY
  AS g(assignment_id, won, max_duration_seconds, caller_id, paced, n)
JOIN call_assignments a ON a.id = g.assignment_id
{CALL_JOINS}
WHERE g.won
ORDER BY g.n
"""

# Claim due calls and put each on a provider (claim_and_assign_calls) and, for a claim of at
# most %(gate)s calls of one tenant, win their dial gates in the same transaction
# (claim_and_gate_calls; gate 0: never): every call claimed, in
# claim order, with its assignment's state after the gates, and for the calls whose gate was won
# (state 'dialing') what GATE_AND_LOAD loads (the other rows' provider and template are NULL:
# they are not dialed from this result). The queue
# row's part comes from the function (``q`` here): the claim may take a call committed after
# this statement's snapshot, in which a join on call_queue would not find it.
CLAIM_AND_GATE = f"""
SELECT q.assignment_id, q.state, NULL::text AS provider_call_id, q.dialing_at, q.attempt,
       0 AS poll_count, q.queue_id, q.queue_status, q.provider_id AS claimed_provider_id,
       {CALL_DETAIL_COLUMNS}, q.max_duration_seconds, q.caller_id, q.paced
FROM claim_and_gate_calls(%(limit)s, %(worker)s, %(lease_seconds)s, %(gate)s) WITH ORDINALITY
  AS q(queue_id, assignment_id, provider_id, state, queue_status, attempt, dialing_at,
       max_duration_seconds, caller_id, paced, recipient_name, recipient_phone,
       recipient_email, custom_variables, template_snapshot, n)
LEFT JOIN call_service_providers p ON p.id = q.provider_id AND q.state = 'dialing'
{TEMPLATE_JOIN}
ORDER BY q.n
"""

# Every active provider (health probes, webhook authentication).
LOAD_PROVIDERS = f"SELECT {PROVIDER_COLUMNS} FROM call_service_providers p WHERE p.is_active"

# Record the provider's ids of calls that were dialed (dialing -> placed, in the order given)
# and their first polls; returns the calls whose first poll was set, with their poll token.
MARK_PLACED = """
SELECT assignment_id, poll_count
FROM mark_calls_placed(%(assignment_ids)s::uuid[], %(provider_call_ids)s::text[],
                       %(first_poll_seconds)s::float8[])
"""

# End a call with a conversation: history, usage, provider stats, slot freed (idempotent).
COMPLETE = """
SELECT complete_call(
  p_assignment_id => %(assignment_id)s::uuid,
  p_duration_seconds => %(duration_seconds)s::float8,
  p_recording_url => %(recording_url)s::text,
  p_transcript => %(transcript)s::text,
  p_cost => %(cost)s::float8,
  p_provider_call_id => %(provider_call_id)s::text,
  p_started_at => %(started_at)s::timestamptz,
  p_ended_at => %(ended_at)s::timestamptz)
"""

# End a call without one: a retry with backoff, a failover, or the final failure (idempotent).
FAIL = """
SELECT handle_failed_call(
  p_assignment_id => %(assignment_id)s::uuid,
  p_failure_kind => %(kind)s::text,
  p_error => %(error)s::text,
  p_retry_after_seconds => %(retry_after_seconds)s::int,
  p_duration_seconds => %(duration_seconds)s::float8,
  p_provider_call_id => %(provider_call_id)s::text)
"""

# Give a call that was never sent back to the queue (no attempt used), due after a delay.
RELEASE = """
SELECT release_assignment(%(assignment_id)s::uuid, %(reason)s::text, %(delay_seconds)s::float8)
"""

# Advance each placed call's poll token if it still holds the expected value, and note its
# next poll; returns the calls advanced with their new token.
TOUCH_POLLS = """
UPDATE call_assignments a
SET last_polled_at = now(), next_poll_at = now() + make_interval(secs => x.delay),
    poll_count = a.poll_count + 1
FROM unnest(%(assignment_ids)s::uuid[], %(expected)s::int[], %(delays)s::float8[])
     AS x(id, expected, delay)
WHERE a.id = x.id AND a.state = 'placed' AND a.poll_count = x.expected
RETURNING a.id, a.poll_count
"""

# Note what the provider reports of placed calls (ringing, in_progress) in the event log, once
# per attempt and kind: a kind already logged for the attempt is skipped, so polling a ringing
# call again writes nothing (one index probe per call on call_events_queue_idx).
RECORD_PROVIDER_STATES = """
SELECT record_call_event(a.queue_id, x.kind, '{}'::jsonb)
FROM unnest(%(assignment_ids)s::uuid[], %(kinds)s::text[]) AS x(id, kind)
JOIN call_assignments a ON a.id = x.id AND a.state = 'placed'
WHERE NOT EXISTS (SELECT 1 FROM call_events e
                  WHERE e.queue_id = a.queue_id AND e.assignment_id = a.id AND e.kind = x.kind)
"""

# Whether beat's ticks find work: a due call, a due poll, a due notification (worker/beat.py).
# With a tracker key held (the leading worker tracks in process), polls only once one is
# overdue by the fallback seconds, and with wake_tracker a due poll wakes the tracker (NOTIFY).
DUE_WORK = """
SELECT calls, polls, notifications
FROM due_work(%(tracker_key)s::bigint, %(fallback_seconds)s::float8, %(wake_tracker)s::boolean)
"""

# Take the placed calls whose next poll is due, oldest first: their poll deadline moves ahead,
# so no other tick takes them while they are polled; returns (assignment, poll token).
_TAKE_DUE = """
UPDATE call_assignments a
SET next_poll_at = now() + make_interval(secs => poll_deadline_seconds())
FROM (SELECT d.id FROM call_assignments d
      WHERE d.state = 'placed'
        AND d.next_poll_at <= now() - make_interval(secs => %(defer)s::float8)
      ORDER BY d.next_poll_at LIMIT %(limit)s
      FOR UPDATE SKIP LOCKED) due
WHERE a.id = due.id
"""
TAKE_DUE_POLLS = f"{_TAKE_DUE}RETURNING a.id, a.poll_count\n"

# A tick's first chunk: TAKE_DUE_POLLS and LOAD_CALLS in one round trip. The assignment
# columns are the rows the take updated (its RETURNING: the versions it locked, each
# poll_count the token it took); the queue row, provider and template are read beside them.
TAKE_DUE_CALLS = f"""
WITH taken AS ({_TAKE_DUE}RETURNING a.*)
SELECT {CALL_COLUMNS} FROM taken a {CALL_JOINS}
"""

# The assignment each (provider, provider call id) belongs to, the newest if several (webhooks).
FIND_ASSIGNMENTS_BY_PROVIDER_CALLS = """
SELECT x.provider_id, x.call_id AS provider_call_id, f.id
FROM unnest(%(provider_ids)s::uuid[], %(provider_call_ids)s::text[]) AS x(provider_id, call_id)
CROSS JOIN LATERAL (SELECT a.id FROM call_assignments a
                    WHERE a.provider_id = x.provider_id AND a.provider_call_id = x.call_id
                    ORDER BY a.created_at DESC LIMIT 1) f
"""

# Expired claims and assignments: what the reaper did, and what the worker must resume.
REAP = "SELECT queue_id, assignment_id, action FROM reap_expired_leases()"

# Recount every provider's slots from its live assignments.
RECONCILE_SLOTS = "SELECT reconcile_provider_slots()"

# A create slot in the provider's fleet-wide schedule: seconds to wait, or NULL (none in time).
RESERVE_CREATE = "SELECT reserve_provider_create(%(provider_id)s::uuid, %(max_wait)s::float8)"

# Put a gated call back in the queue, undialed, due when its create slot would have come.
DEFER_DIAL = "SELECT defer_dial(%(assignment_id)s::uuid, %(seconds)s::float8)"

# Recount every tenant's counters and every period's reserved minutes.
RECONCILE_COUNTERS = "SELECT reconcile_tenant_counters()"

# A health probe's result: status, latency, failures in a row, circuit.
RECORD_HEALTH = """
SELECT record_provider_health(%(provider_id)s::uuid, %(ok)s::boolean, %(latency_ms)s::float8,
                              %(error)s::text)
"""

# Open the next usage period of subscriptions whose period ended.
ROLLOVER = "SELECT rollover_usage_periods()"

# Campaigns past their end or out of calls: queued calls canceled, status completed.
CLOSE_CAMPAIGNS = "SELECT close_campaigns()"

# The outbox of call.ended notifications: claim due ones (a lease; the attempt is the token),
# load what one attempt sends, record its result (backoff and give-up live in SQL).
CLAIM_NOTIFICATIONS = """
SELECT notification_id, attempt FROM claim_notifications(%(limit)s, %(lease_seconds)s)
"""
NOTIFICATION_DELIVERY = """
SELECT url, secret, body FROM notification_delivery(%(id)s::uuid, %(attempt)s)
"""
RECORD_NOTIFICATION = """
SELECT record_notification_result(%(id)s::uuid, %(attempt)s, %(ok)s, %(http_status)s::int,
                                  %(error)s::text)
"""

# The call-event log's retention: delete one batch of events older than the retention.
PRUNE_EVENTS = """
SELECT prune_call_events(make_interval(secs => %(retention_seconds)s::float8), %(limit)s::int)
"""


@dataclass(frozen=True, slots=True)
class Assigned:
    """One call the claim put on a provider."""

    queue_id: UUID
    assignment_id: UUID
    provider_id: UUID


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim took: every call assigned (claim order), and of those the claim gated
    itself, the calls whose gate it won (ready to dial) and the ids of those a gate refused."""

    assigned: list[Assigned]
    won: list[CallRow]
    refused: list[UUID]

    @property
    def gated(self) -> bool:
        """True when the claim passed its calls' gates itself (they need no gate_and_load)."""
        return bool(self.won or self.refused)


@dataclass(frozen=True, slots=True)
class Reaped:
    """A row the reaper touched, and what the worker should do about it."""

    queue_id: UUID
    assignment_id: UUID | None
    action: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one notification attempt sends (URL and secret kept out of reprs and logs)."""

    url: str = field(repr=False)
    secret: str = field(repr=False)
    body: dict[str, Any]


class Database:
    """A small pool of psycopg connections and the named statements above."""

    def __init__(self, url: str, *, max_size: int = 8, pooled: bool | None = None) -> None:
        kwargs = {"autocommit": True, **connect_kwargs(url, pooled)}
        # The pool grows on demand and keeps what it grew: no connection is closed for being
        # idle (psycopg_pool's default closed them after 10 minutes). A new server session
        # plans every statement and compiles every PL/pgSQL function again on first use, about
        # 40 ms of server CPU per connection for the call path, so a pool that shrank while
        # idle paid it again in the next burst: about 0.6 ms per call of a 1,000-call burst
        # (bench/notes/e2e_session5.md). Connections are still renewed after max_lifetime
        # (an hour) and checked when broken.
        self._pool = ConnectionPool(
            libpq_url(url),
            min_size=1,
            max_size=max_size,
            max_idle=POOL_MAX_IDLE_SECONDS,
            open=False,
            kwargs=kwargs,
        )
        self._lock = threading.Lock()
        self._opened = False

    def _ensure_open(self) -> ConnectionPool:
        if not self._opened:
            with self._lock:
                if not self._opened:
                    self._pool.open(wait=True, timeout=30)
                    self._opened = True
        return self._pool

    def close(self) -> None:
        """Close the pool (it reopens on next use)."""
        if self._opened:
            self._pool.close()
            self._opened = False

    def scalar(self, query: str, params: Params | None = None) -> Any:
        """The first column of the first row, or None."""
        rows = self._run(query, params)
        return None if not rows else next(iter(rows[0].values()))

    def rows(self, query: str, params: Params | None = None) -> list[dict[str, Any]]:
        """Every row, as column -> value."""
        return self._run(query, params)

    def _run(self, query: str, params: Params | None) -> list[dict[str, Any]]:
        """One statement in a transaction of its own (autocommit). A statement PostgreSQL chose
        as a deadlock's victim was rolled back whole, so it runs again (at most
        ``DEADLOCK_ATTEMPTS`` times): the rows several statements of a function take, a
        tenant's counter stripes among them, are not always taken in one order."""
        for _ in range(DEADLOCK_ATTEMPTS - 1):
            try:
                return self._run_once(query, params)
            except psycopg.errors.DeadlockDetected:
                continue
        return self._run_once(query, params)

    def _run_once(self, query: str, params: Params | None) -> list[dict[str, Any]]:
        with self._ensure_open().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            # rows only when the statement returned some (its result's status, not
            # ``cur.description``, which builds a Column per result column at every call:
            # 70-90 us of a lone claim's 35 columns)
            result = cur.pgresult
            if result is None or result.status != pq.ExecStatus.TUPLES_OK:
                return []
            return list(cur.fetchall())

    # -- named operations -------------------------------------------------------------------

    def claim_and_assign(self, limit: int, worker: str, lease_seconds: int) -> list[Assigned]:
        """Claim up to ``limit`` due calls and assign each to a provider (no gate passed)."""
        return self.claim_and_gate(limit, worker, lease_seconds, gate=0).assigned

    def claim_and_gate(self, limit: int, worker: str, lease_seconds: int, gate: int) -> Claim:
        """Claim up to ``limit`` due calls; a claim of at most ``gate`` calls of one tenant also
        passes their dial gates, in the same transaction (one round trip for a lone call)."""
        params = {"limit": limit, "worker": worker, "lease_seconds": lease_seconds, "gate": gate}
        rows = self.rows(CLAIM_AND_GATE, params)
        assigned = [
            Assigned(r["queue_id"], r["assignment_id"], r["claimed_provider_id"]) for r in rows
        ]
        won = [CallRow.from_row(r) for r in rows if r["state"] == AssignmentState.DIALING]
        refused = [
            r["assignment_id"]
            for r in rows
            if r["state"] not in (AssignmentState.DIALING, AssignmentState.ASSIGNED)
        ]
        return Claim(assigned, won, refused)

    def load_call(self, assignment_id: UUID | str) -> CallRow | None:
        """The call behind an assignment, or None when there is no such assignment."""
        return self.load_calls([assignment_id]).get(str(assignment_id))

    def load_calls(self, assignment_ids: Sequence[UUID | str]) -> dict[str, CallRow]:
        """The calls behind these assignments, by assignment id (missing ones left out)."""
        if not assignment_ids:
            return {}
        rows = self.rows(LOAD_CALLS, {"assignment_ids": [str(a) for a in assignment_ids]})
        return {str(r["assignment_id"]): CallRow.from_row(r) for r in rows}

    def gate_and_load(self, assignment_ids: Sequence[UUID | str]) -> list[CallRow]:
        """Win the dial gate of each call and load it; calls another task won are left out.
        The calls won come back in the order given (a chunk's claim order, which its creates
        follow).

        The gates are taken in sorted order, so two tasks with overlapping chunks never wait
        on each other in a cycle.
        """
        place = {str(a): n for n, a in enumerate(assignment_ids)}
        rows = self.rows(GATE_AND_LOAD, {"assignment_ids": sorted(place)})
        rows.sort(key=lambda r: place[str(r["assignment_id"])])
        return [CallRow.from_row(r) for r in rows]

    def active_providers(self) -> list[ProviderRow]:
        """Every active provider."""
        return [ProviderRow.from_row(r) for r in self.rows(LOAD_PROVIDERS)]

    def mark_placed(self, placed: Mapping[str, tuple[str, float]]) -> dict[str, int]:
        """dialing -> placed for each assignment id -> (provider call id, seconds to its first
        poll), sorted by id, in one statement; the poll token of each call whose first poll was
        set (a call placed before, a repeated request, keeps its polls and is left out)."""
        ids = sorted(placed)
        params = {
            "assignment_ids": ids,
            "provider_call_ids": [placed[i][0] for i in ids],
            "first_poll_seconds": [placed[i][1] for i in ids],
        }
        rows = self.rows(MARK_PLACED, params) if ids else []
        return {str(r["assignment_id"]): int(r["poll_count"]) for r in rows}

    def complete(
        self,
        assignment_id: UUID | str,
        *,
        duration_seconds: float | None,
        recording_url: str | None,
        transcript: str | None,
        cost: float | Decimal | None,
        provider_call_id: str | None,
        started_at: datetime | None,
        ended_at: datetime | None,
    ) -> UUID | None:
        """Complete the call; the history row's id (None when it ended without one)."""
        params = {
            "assignment_id": str(assignment_id),
            "duration_seconds": duration_seconds,
            "recording_url": recording_url,
            "transcript": transcript,
            "cost": cost,
            "provider_call_id": provider_call_id,
            "started_at": started_at,
            "ended_at": ended_at,
        }
        result = self.scalar(COMPLETE, params)
        return result if result is None else UUID(str(result))

    def fail(
        self,
        assignment_id: UUID | str,
        kind: str,
        error: str | None,
        *,
        retry_after_seconds: int | None = None,
        duration_seconds: float | None = None,
        provider_call_id: str | None = None,
    ) -> str:
        """Fail the call; ``retry_scheduled``, ``failed``, ``canceled`` or ``noop``."""
        params = {
            "assignment_id": str(assignment_id),
            "kind": kind,
            "error": error,
            "retry_after_seconds": retry_after_seconds,
            "duration_seconds": duration_seconds,
            "provider_call_id": provider_call_id,
        }
        return str(self.scalar(FAIL, params))

    def touch_polls(self, polls: Sequence[tuple[str, int, float]]) -> dict[str, int]:
        """Advance the poll token of each (assignment id, expected token, delay) still current.

        The counter is a token: of two tracking chains for the same call (the reaper restarted
        one that was only late), only the one holding the current value goes on. Returns the
        new token of each call advanced.
        """
        polls = sorted(polls)
        params = {
            "assignment_ids": [p[0] for p in polls],
            "expected": [p[1] for p in polls],
            "delays": [p[2] for p in polls],
        }
        if not polls:
            return {}
        return {str(r["id"]): int(r["poll_count"]) for r in self.rows(TOUCH_POLLS, params)}

    def record_provider_states(self, observed: Sequence[tuple[str, str]]) -> int:
        """Log each (assignment id, kind) the provider reported of a placed call (ringing or
        in_progress), once per attempt and kind; returns how many events were written."""
        if not observed:
            return 0
        params = {"assignment_ids": [a for a, _ in observed], "kinds": [k for _, k in observed]}
        return len(self.rows(RECORD_PROVIDER_STATES, params))

    def due_work(
        self,
        tracker_key: int | None = None,
        fallback_seconds: float = 0.0,
        wake_tracker: bool = False,
    ) -> dict[str, bool]:
        """Which of beat's ticks find work now: ``calls``, ``polls``, ``notifications``. While
        a session holds ``tracker_key``: ``polls`` only for a poll overdue by
        ``fallback_seconds``, and with ``wake_tracker`` a due poll wakes the tracker."""
        params = {
            "tracker_key": tracker_key,
            "fallback_seconds": fallback_seconds,
            "wake_tracker": wake_tracker,
        }
        rows = self.rows(DUE_WORK, params)
        return {name: bool(value) for name, value in rows[0].items()}

    def take_due_polls(self, limit: int, defer: float = 0.0) -> list[tuple[str, int]]:
        """Up to ``limit`` placed calls whose poll is due (overdue by ``defer`` seconds), as
        (assignment id, poll token)."""
        rows = self.rows(TAKE_DUE_POLLS, {"limit": limit, "defer": defer})
        return [(str(r["id"]), int(r["poll_count"])) for r in rows]

    def take_due_calls(self, limit: int, defer: float = 0.0) -> list[CallRow]:
        """``take_due_polls`` with each call loaded (its ``poll_count`` is its poll token), in
        one statement: the chunk a tracking tick polls itself."""
        rows = self.rows(TAKE_DUE_CALLS, {"limit": limit, "defer": defer})
        return [CallRow.from_row(r) for r in rows]

    def assignments_for_provider_calls(
        self, calls: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], UUID]:
        """The newest assignment holding each (provider id, provider call id), in one round
        trip; pairs that match no assignment are left out."""
        if not calls:
            return {}
        params = {
            "provider_ids": [str(p) for p, _ in calls],
            "provider_call_ids": [c for _, c in calls],
        }
        rows = self.rows(FIND_ASSIGNMENTS_BY_PROVIDER_CALLS, params)
        return {
            (str(r["provider_id"]), str(r["provider_call_id"])): UUID(str(r["id"])) for r in rows
        }

    def reap(self) -> list[Reaped]:
        """Run the reaper once."""
        return [Reaped(r["queue_id"], r["assignment_id"], r["action"]) for r in self.rows(REAP)]

    def reconcile_slots(self) -> int:
        """Recount slots; the number of provider rows corrected."""
        return int(self.scalar(RECONCILE_SLOTS) or 0)

    def reserve_create(self, provider_id: UUID | str, max_wait: float) -> float | None:
        """Seconds to wait before this create (fleet-wide pacing); None: no slot in time."""
        wait = self.scalar(RESERVE_CREATE, {"provider_id": str(provider_id), "max_wait": max_wait})
        return None if wait is None else float(wait)

    def defer_dial(self, assignment_id: UUID | str, seconds: float) -> bool:
        """Back to the queue, undialed, due in ``seconds``."""
        params = {"assignment_id": str(assignment_id), "seconds": seconds}
        return bool(self.scalar(DEFER_DIAL, params))

    def reconcile_counters(self) -> int:
        """Recount tenant counters and reserved minutes; the number of rows corrected."""
        return int(self.scalar(RECONCILE_COUNTERS) or 0)

    def release(self, assignment_id: UUID | str, reason: str, delay_seconds: float = 0.0) -> bool:
        """Release a call proven never sent; False when it was no longer assigned or dialing."""
        params = {"assignment_id": str(assignment_id), "reason": reason}
        return bool(self.scalar(RELEASE, {**params, "delay_seconds": delay_seconds}))

    def record_health(
        self, provider_id: UUID | str, ok: bool, latency_ms: float, error: str | None
    ) -> str:
        """Record a probe or call result; the provider's status after it."""
        params = {"provider_id": str(provider_id), "ok": ok, "latency_ms": latency_ms}
        return str(self.scalar(RECORD_HEALTH, {**params, "error": error}))

    def rollover(self) -> int:
        """Roll usage periods over; the number of subscriptions moved on."""
        return int(self.scalar(ROLLOVER) or 0)

    def claim_notifications(self, limit: int, lease_seconds: int) -> list[tuple[UUID, int]]:
        """Due notifications, leased: (id, attempt token) pairs."""
        params = {"limit": limit, "lease_seconds": lease_seconds}
        return [
            (r["notification_id"], r["attempt"]) for r in self.rows(CLAIM_NOTIFICATIONS, params)
        ]

    def notification_delivery(self, notification_id: UUID | str, attempt: int) -> Delivery | None:
        """What to send for this attempt; None when it is no longer the current one."""
        rows = self.rows(NOTIFICATION_DELIVERY, {"id": str(notification_id), "attempt": attempt})
        return Delivery(rows[0]["url"], rows[0]["secret"], rows[0]["body"]) if rows else None

    def record_notification(
        self,
        notification_id: UUID | str,
        attempt: int,
        ok: bool,
        http_status: int | None,
        error: str | None,
    ) -> str:
        """delivered, retry, failed or noop (a stale attempt)."""
        params = {
            "id": str(notification_id),
            "attempt": attempt,
            "ok": ok,
            "http_status": http_status,
            "error": error,
        }
        return str(self.scalar(RECORD_NOTIFICATION, params))

    def close_campaigns(self) -> int:
        """End campaigns past their end time or out of calls; the number completed."""
        return int(self.scalar(CLOSE_CAMPAIGNS) or 0)

    def prune_events(self, retention_seconds: float, limit: int) -> int:
        """Delete one batch of expired call events; how many went."""
        params = {"retention_seconds": retention_seconds, "limit": limit}
        return int(self.scalar(PRUNE_EVENTS, params) or 0)
