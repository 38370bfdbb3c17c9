"""``callq queue``: the queue and the providers at a glance, as plain-text tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from models.session import connect

COUNTS = "SELECT status, count(*) FROM call_queue GROUP BY status ORDER BY status"
OLDEST_DUE = """
SELECT id, priority, scheduled_time, now() - scheduled_time AS waiting
FROM call_queue WHERE status = 'queued' AND scheduled_time <= now()
ORDER BY scheduled_time LIMIT 1
"""
# Calls a calling rule holds (queued, moved to their next allowed time) or canceled.
HELD_BY_RULE = """
SELECT hold_reason, count(*), min(scheduled_time) FROM call_queue
WHERE status = 'queued' AND hold_reason IS NOT NULL GROUP BY hold_reason
UNION ALL
SELECT last_error, count(*), NULL FROM call_queue
WHERE status = 'canceled' AND last_error IN ('do_not_call', 'consent_missing') GROUP BY last_error
ORDER BY 1
"""
TEST_CLOCK = "SELECT test_now FROM calling_settings WHERE test_now IS NOT NULL"
PROVIDERS = """
SELECT p.name, p.provider_type, p.is_active, p.priority, p.max_concurrent_calls,
       l.current_calls, l.available_slots, a.status, a.consecutive_failures,
       round(a.latency_ms::numeric, 1), a.circuit_open_until > now(), a.last_check
FROM call_service_providers p LEFT JOIN provider_availability a ON a.provider_id = p.id
JOIN provider_load l ON l.provider_id = p.id
ORDER BY p.priority, p.name
"""


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the headers."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def queue_report(conn: psycopg.Connection[Any]) -> str:
    """The tables of ``callq queue`` as one string."""
    counts = conn.execute(COUNTS).fetchall()
    oldest = conn.execute(OLDEST_DUE).fetchall()
    held = conn.execute(HELD_BY_RULE).fetchall()
    clock = conn.execute(TEST_CLOCK).fetchall()
    providers = conn.execute(PROVIDERS).fetchall()
    parts = ["Queue by status", format_table(["status", "calls"], counts) if counts else "(empty)"]
    parts += ["", "Oldest due call"]
    parts.append(
        format_table(["queue id", "priority", "scheduled", "waiting"], oldest)
        if oldest
        else "(none)"
    )
    parts += ["", "Held or canceled by calling rules"]
    parts.append(format_table(["rule", "calls", "next allowed"], held) if held else "(none)")
    if clock:
        parts.append(
            f"WARNING: the rules' test clock is set (calling_settings.test_now = {clock[0][0]})"
        )
    parts += ["", "Providers"]
    headers = [
        "name",
        "type",
        "active",
        "priority",
        "max",
        "in use",
        "free",
        "health",
        "failures",
        "latency ms",
        "circuit open",
        "last check",
    ]
    parts.append(format_table(headers, providers) if providers else "(none)")
    return "\n".join(parts)


CAMPAIGNS = """
SELECT campaign_id, name, status, calls, queued, in_flight, completed, failed, canceled,
       attempts, answer_rate, minutes, round(cost::numeric, 4), held,
       to_char(first_call_at, 'YYYY-MM-DD HH24:MI:SS'),
       to_char(last_call_at, 'YYYY-MM-DD HH24:MI:SS')
FROM call_campaign_progress
WHERE %(all)s OR status IN ('draft', 'running', 'paused') OR ended_at > now() - interval '1 day'
ORDER BY created_at DESC
LIMIT %(limit)s
"""
CAMPAIGN_HEADERS = [
    "campaign",
    "name",
    "status",
    "calls",
    "queued",
    "in flight",
    "completed",
    "failed",
    "canceled",
    "attempts",
    "answer rate",
    "minutes",
    "cost",
    "held",
    "first call",
    "last call",
]


def campaigns_report(conn: psycopg.Connection[Any], *, all_: bool = False, limit: int = 50) -> str:
    """``callq campaigns``: each campaign's progress (open ones and those ended today)."""
    rows = conn.execute(CAMPAIGNS, {"all": all_, "limit": limit}).fetchall()
    return format_table(CAMPAIGN_HEADERS, rows) if rows else "(no campaigns)"


def print_queue(database_url: str, pooled: bool | None = None) -> None:
    with connect(database_url, pooled=pooled) as conn:
        print(queue_report(conn))


def print_campaigns(
    database_url: str, pooled: bool | None = None, *, all_: bool = False, limit: int = 50
) -> None:
    with connect(database_url, pooled=pooled) as conn:
        print(campaigns_report(conn, all_=all_, limit=limit))
