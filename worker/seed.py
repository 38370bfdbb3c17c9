"""Demo and test data: a user with a plan, a template, and providers pointed at the simulator.

Shared by ``callq demo``, the end-to-end tests, the benchmarks and the drills. Phone numbers are
from the reserved 555-01xx fiction range; outcomes can be forced through the simulator's
per-suffix rules (``outcomes_by_suffix``). The calling rules allow a call only from 08:00 to
21:00 at the recipient, and a fictional number's zones are every zone of the +1 country code:
calls are scheduled with a recipient zone where it is early afternoon now (:func:`daytime_zone`),
so the demo and the tests run at any hour. The demo plan allows many attempts per number per
day, because the fictional numbers repeat.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

# One city per UTC offset from -11 to +14: one of them is always near 14:00 local time.
DAYTIME_CANDIDATES = (
    "Pacific/Pago_Pago",
    "Pacific/Honolulu",
    "America/Anchorage",
    "America/Los_Angeles",
    "America/Denver",
    "America/Chicago",
    "America/New_York",
    "America/Halifax",
    "America/Sao_Paulo",
    "Atlantic/South_Georgia",
    "Atlantic/Cape_Verde",
    "Europe/London",
    "Europe/Paris",
    "Europe/Athens",
    "Europe/Moscow",
    "Asia/Dubai",
    "Asia/Karachi",
    "Asia/Dhaka",
    "Asia/Bangkok",
    "Asia/Singapore",
    "Asia/Tokyo",
    "Australia/Brisbane",
    "Pacific/Noumea",
    "Pacific/Auckland",
    "Pacific/Tongatapu",
    "Pacific/Kiritimati",
)
SIM_VAPI_KEY = "sim-vapi-key"


def daytime_zone(now: datetime | None = None) -> str:
    """An IANA zone where the local time is closest to 14:00 at ``now`` (default: now)."""
    at = now or datetime.now(UTC)

    def distance(zone: str) -> float:
        local = at.astimezone(ZoneInfo(zone))
        return abs(local.hour + local.minute / 60 - 14)

    return min(DAYTIME_CANDIDATES, key=distance)


SIM_SYNTHFLOW_KEY = "sim-synthflow-key"
SIM_RETELL_KEY = "sim-retell-key"
RETELL_FROM_NUMBER = "+14155550100"  # the fiction range; a Retell row's outbound number


@dataclass(frozen=True)
class Seeded:
    """Ids of what :func:`seed_demo` created."""

    user_id: uuid.UUID
    template_id: uuid.UUID
    plan_id: uuid.UUID
    provider_ids: dict[str, uuid.UUID] = field(default_factory=dict)


def seed_demo(
    conn: psycopg.Connection[Any],
    *,
    sim_base_url: str,
    providers: Sequence[str] = ("vapi", "synthflow"),
    max_concurrent_calls: int = 10,
    call_limit: int | None = None,
    webhook_secret: str | None = None,
    email: str | None = None,
    minute_limit: int | None = None,
    plan_concurrency: int | None = None,
) -> Seeded:
    """Create one user (through ``auth.users``, as Supabase does), plan, template and providers.

    ``webhook_secret`` goes to the providers' ``webhook_secret`` column (a value or an
    ``env:NAME`` reference); without it every webhook is refused and calls are polled.

    The plan's ``max_concurrent_calls`` is ``plan_concurrency``, by default every provider slot
    (so the plan is not what limits the demo, the tests or the benchmarks unless they ask).
    """
    plan_cap = plan_concurrency or max(1, max_concurrent_calls * max(len(providers), 1))
    base = sim_base_url.rstrip("/")
    user_id = uuid.uuid4()
    email = email or f"demo-{user_id.hex[:8]}@example.com"
    with conn.transaction():
        conn.execute("INSERT INTO auth.users (id, email) VALUES (%s, %s)", (user_id, email))
        conn.execute(
            "UPDATE public.users SET full_name = 'Demo User' WHERE id = %s AND full_name IS NULL",
            (user_id,),
        )
        plan_id = _one(
            conn,
            "INSERT INTO subscription_plans (name, price, billing_interval, call_limit,"
            " minute_limit, max_concurrent_calls, features, contact_attempts_per_24h)"
            " VALUES (%s, 49, 'month', %s, %s, %s, %s, 1000000) RETURNING id",
            (
                f"Demo {user_id.hex[:8]}",
                call_limit,
                minute_limit,
                plan_cap,
                json.dumps({"recording": True}),
            ),
        )
        conn.execute(
            "INSERT INTO user_subscriptions (user_id, plan_id, status) VALUES (%s, %s, 'active')",
            (user_id, plan_id),
        )
        template_id = _one(
            conn,
            "INSERT INTO call_templates (created_by, name, description, category, tags, script,"
            " variables, first_message, is_public) VALUES (%s, 'Appointment reminder',"
            " 'Reminds a customer of their appointment', 'reminders', ARRAY['demo'],"
            " %s, %s, %s, false) RETURNING id",
            (
                user_id,
                "You are a friendly assistant calling from {{company_name}} to confirm an"
                " appointment. Be brief and polite.",
                json.dumps(["company_name"]),
                "Hi, this is a quick call from {{company_name}}.",
            ),
        )
        provider_ids = {
            kind: _provider(conn, kind, base, max_concurrent_calls, prio, webhook_secret)
            for prio, kind in enumerate(providers, start=1)
        }
    return Seeded(user_id, template_id, plan_id, provider_ids)


def _provider(
    conn: psycopg.Connection[Any],
    kind: str,
    base: str,
    max_calls: int,
    priority: int,
    webhook_secret: str | None,
) -> uuid.UUID:
    if kind == "vapi":
        url, key = f"{base}/vapi", SIM_VAPI_KEY
        config: dict[str, Any] = {
            "assistant_id": str(uuid.uuid4()),
            "phone_number_id": str(uuid.uuid4()),
        }
    elif kind == "retell":
        url, key = f"{base}/retell", SIM_RETELL_KEY
        config = {"agent_id": f"agent_{uuid.uuid4().hex}", "from_number": RETELL_FROM_NUMBER}
        # Retell signs its webhooks with the account's API key
        webhook_secret = SIM_RETELL_KEY if webhook_secret is not None else None
    else:
        url, key = f"{base}/synthflow/v2", SIM_SYNTHFLOW_KEY
        config = {"model_id": str(uuid.uuid4()), "creates_per_second": 1000}
    provider_id = _one(
        conn,
        "INSERT INTO call_service_providers (name, provider_type, api_key, api_secret,"
        " webhook_secret, base_url, max_concurrent_calls, priority, config)"
        " VALUES (%s, %s, %s, NULL, %s, %s, %s, %s, %s) RETURNING id",
        (
            f"{kind.title()} (simulator) {uuid.uuid4().hex[:6]}",
            kind,
            key,
            webhook_secret,
            url,
            max_calls,
            priority,
            json.dumps(config),
        ),
    )
    conn.execute(
        "INSERT INTO provider_availability (provider_id, current_calls, available_slots, status)"
        " VALUES (%s, 0, %s, 'online') ON CONFLICT (provider_id) DO NOTHING",
        (provider_id, max_calls),
    )
    return uuid.UUID(str(provider_id))


def schedule_calls(
    conn: psycopg.Connection[Any],
    seeded: Seeded,
    count: int,
    *,
    delay_seconds: float = 0.0,
    priority: int = 5,
    suffix: str | None = None,
    start: int = 0,
    timezone: str | None = None,
) -> list[uuid.UUID]:
    """Schedule ``count`` calls through ``schedule_call`` (one transaction); return queue ids.

    ``timezone``: the recipients' zone, default :func:`daytime_zone`.
    """
    ids: list[uuid.UUID] = []
    zone = timezone or daytime_zone()
    with conn.transaction():
        for i in range(start, start + count):
            phone = demo_phone(i, suffix)
            ids.append(
                _one(
                    conn,
                    "SELECT schedule_call(%s, %s, %s, %s, NULL,"
                    " now() + make_interval(secs => %s), %s, %s, %s, NULL, %s)",
                    (
                        seeded.user_id,
                        seeded.template_id,
                        f"Customer {i}",
                        phone,
                        delay_seconds,
                        priority,
                        json.dumps({"company_name": "Acme Inc"}),
                        json.dumps({"source": "demo", "n": i}),
                        zone,
                    ),
                )
            )
    return ids


def demo_phone(i: int, suffix: str | None = None) -> str:
    """A fictional E.164 number; ``suffix`` (4 digits) forces a simulator outcome rule."""
    tail = suffix if suffix is not None else f"{i % 10000:04d}"
    return f"+1555{(i // 10000) % 1000:03d}{tail}"


def _one(conn: psycopg.Connection[Any], query: str, params: Sequence[Any]) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]
