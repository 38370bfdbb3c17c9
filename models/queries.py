"""Named SQL the worker runs, each a thin call of a function in supabase/migrations.

The concurrency-critical logic (claiming, slot accounting, idempotent completion) lives in the
SQL functions; this module only names the statements and moves rows into plain dataclasses.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

CLAIM_AND_ASSIGN = (
    "SELECT queue_id, assignment_id, provider_id FROM claim_and_assign_calls(%s, %s, %s)"
)
MARK_DIALING = "SELECT mark_call_dialing(%s)"
MARK_PLACED = "SELECT mark_call_placed(%s, %s)"
COMPLETE = (
    "SELECT complete_call(p_assignment_id => %s::uuid, p_duration_seconds => %s::numeric,"
    " p_recording_url => %s::text, p_transcript => %s::text, p_cost => %s::numeric,"
    " p_provider_call_id => %s::text, p_started_at => %s::timestamptz,"
    " p_ended_at => %s::timestamptz)"
)
FAIL = (
    "SELECT handle_failed_call(p_assignment_id => %s::uuid, p_failure_kind => %s::text,"
    " p_error => %s::text, p_retry_after_seconds => %s::int, p_duration_seconds => %s::numeric,"
    " p_provider_call_id => %s::text)"
)
REAP = "SELECT queue_id, assignment_id, action FROM reap_expired_leases()"
RECONCILE_SLOTS = "SELECT reconcile_provider_slots()"
RECORD_HEALTH = "SELECT record_provider_health(%s::uuid, %s::boolean, %s::numeric, %s::text)"
ROLLOVER = "SELECT rollover_usage_periods()"

# One read that gathers what a dispatch or a poll needs: assignment, queue row, template, provider.
LOAD_CALL = """
SELECT a.id AS assignment_id, a.state, a.provider_call_id, a.dialing_at, a.attempt, a.poll_count,
       q.id AS queue_id, q.status AS queue_status, q.recipient_name, q.recipient_phone,
       q.recipient_email, q.custom_variables,
       q.template_name, q.script, q.first_message,
       p.id AS provider_id, p.name AS provider_name, p.provider_type, p.api_key, p.api_secret,
       p.webhook_secret, p.base_url, p.max_concurrent_calls, p.capabilities, p.config
FROM call_assignments a
JOIN call_queue q ON q.id = a.queue_id
JOIN call_service_providers p ON p.id = a.provider_id
WHERE a.id = %s
"""
# The dial gate and the load in one round trip: ``won`` is mark_call_dialing's answer; the other
# columns are read from the statement's snapshot (before the gate's own update).
GATE_AND_LOAD = (
    "SELECT g.won, c.* FROM (SELECT mark_call_dialing(%s::uuid) AS won) g"
    " LEFT JOIN LATERAL (" + LOAD_CALL.replace("%s", "%s::uuid") + ") c ON true"
)
LOAD_PROVIDERS = """
SELECT id AS provider_id, name AS provider_name, provider_type, api_key, api_secret,
       webhook_secret, base_url, max_concurrent_calls, capabilities, config
FROM call_service_providers WHERE is_active
"""
FIND_ASSIGNMENT_BY_PROVIDER_CALL = """
SELECT id FROM call_assignments WHERE provider_id = %s AND provider_call_id = %s
ORDER BY created_at DESC LIMIT 1
"""


@dataclass(frozen=True)
class Assigned:
    """One call the claim put on a provider."""

    queue_id: UUID
    assignment_id: UUID
    provider_id: UUID


@dataclass(frozen=True)
class Reaped:
    """A row the reaper touched, and what the worker should do about it."""

    queue_id: UUID
    assignment_id: UUID | None
    action: str


class Database:
    """A small pool of psycopg connections and the named statements above."""

    def __init__(self, url: str, *, max_size: int = 8) -> None:
        self._pool = ConnectionPool(
            url, min_size=1, max_size=max_size, open=False, kwargs={"autocommit": True}
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
        if self._opened:
            self._pool.close()
            self._opened = False

    def scalar(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        with self._ensure_open().connection() as conn:
            row = conn.execute(query, params).fetchone()
            return None if row is None else row[0]

    def rows(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._ensure_open().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return list(cur.fetchall())

    # -- named operations -------------------------------------------------------------------

    def claim_and_assign(self, limit: int, worker: str, lease_seconds: int) -> list[Assigned]:
        rows = self.rows(CLAIM_AND_ASSIGN, (limit, worker, lease_seconds))
        return [Assigned(r["queue_id"], r["assignment_id"], r["provider_id"]) for r in rows]

    def load_call(self, assignment_id: UUID | str) -> dict[str, Any] | None:
        rows = self.rows(LOAD_CALL, (str(assignment_id),))
        return rows[0] if rows else None

    def gate_and_load(self, assignment_id: UUID | str) -> dict[str, Any] | None:
        """Win the dial gate and load the call; None when another task already won it."""
        rows = self.rows(GATE_AND_LOAD, (str(assignment_id), str(assignment_id)))
        if not rows or not rows[0]["won"] or rows[0]["assignment_id"] is None:
            return None
        return rows[0]

    def active_providers(self) -> list[dict[str, Any]]:
        return self.rows(LOAD_PROVIDERS)

    def mark_dialing(self, assignment_id: UUID | str) -> bool:
        return bool(self.scalar(MARK_DIALING, (str(assignment_id),)))

    def mark_placed(self, assignment_id: UUID | str, provider_call_id: str) -> bool:
        return bool(self.scalar(MARK_PLACED, (str(assignment_id), provider_call_id)))

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
        params = (str(assignment_id), duration_seconds, recording_url, transcript, cost)
        result = self.scalar(COMPLETE, (*params, provider_call_id, started_at, ended_at))
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
        params = (str(assignment_id), kind, error, retry_after_seconds, duration_seconds)
        return str(self.scalar(FAIL, (*params, provider_call_id)))

    def reap(self) -> list[Reaped]:
        return [Reaped(r["queue_id"], r["assignment_id"], r["action"]) for r in self.rows(REAP)]

    def reconcile_slots(self) -> int:
        return int(self.scalar(RECONCILE_SLOTS) or 0)

    def record_health(
        self, provider_id: UUID | str, ok: bool, latency_ms: float, error: str | None
    ) -> str:
        return str(self.scalar(RECORD_HEALTH, (str(provider_id), ok, latency_ms, error)))

    def rollover(self) -> int:
        return int(self.scalar(ROLLOVER) or 0)

    def assignment_for_provider_call(
        self, provider_id: UUID | str, provider_call_id: str
    ) -> UUID | None:
        result = self.scalar(FIND_ASSIGNMENT_BY_PROVIDER_CALL, (str(provider_id), provider_call_id))
        return None if result is None else UUID(str(result))


TOUCH_POLL = """
UPDATE call_assignments
SET last_polled_at = now(), next_poll_at = now() + make_interval(secs => %s),
    poll_count = poll_count + 1
WHERE id = %s AND state = 'placed' AND poll_count = %s
RETURNING poll_count
"""


def touch_poll(db: Database, assignment_id: UUID | str, expected: int, delay: float) -> int | None:
    """Advance a placed call's poll counter if ``expected`` is still current.

    The counter is a token: of two tracking chains for the same call (the reaper restarted one
    that was only late), only the one holding the current value goes on.
    """
    result = db.scalar(TOUCH_POLL, (delay, str(assignment_id), expected))
    return None if result is None else int(result)
