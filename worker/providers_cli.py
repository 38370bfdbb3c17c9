"""``callq providers``: providers as configuration.

    callq providers add --name N --type vapi --base-url URL --api-key env:CALLQ_SECRET_VAPI ...
    callq providers sync FILE|-          a JSON list of providers (or $CALLQ_PROVIDERS)
    callq providers list
    callq providers disable NAME

``add`` and ``sync`` upsert by name (run them at every deploy) and create the provider's
availability row. Keys and webhook secrets should be ``env:NAME`` references resolved by the
worker (names the worker's settings allow, default prefix ``CALLQ_SECRET_``); a literal is
stored as given, with a warning. The type must be a registered adapter and the base URL one of
its official hosts or a host the settings allow (``CALLQ_PROVIDER_ALLOWED_HOSTS``), the same
rules the worker applies before any request. Nothing here prints a key.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from providers.allowlist import ENV_PREFIX
from providers.errors import ConfigError
from providers.registry import get_adapter, official_base_urls
from worker.settings import Settings
from worker.status import format_table

FIELDS = ("name", "type", "base_url", "api_key", "webhook_secret", "max_concurrent_calls",
          "priority", "config", "capabilities", "is_active")  # fmt: skip


@dataclass(frozen=True)
class ProviderSpec:
    """One provider as ops declare it."""

    name: str
    type: str
    base_url: str
    api_key: str
    webhook_secret: str | None = None
    max_concurrent_calls: int = 10
    priority: int = 5
    config: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)
    is_active: bool = True

    @classmethod
    def from_mapping(cls, raw: Any, where: str) -> ProviderSpec:
        """Validate one JSON object; ConfigError naming ``where`` and the field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a provider must be a JSON object")
        unknown = set(raw) - set(FIELDS)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        for required in ("name", "type", "base_url", "api_key"):
            if not isinstance(raw.get(required), str) or not raw[required].strip():
                raise ConfigError(f"{where}: {required} is required (a string)")
        for obj in ("config", "capabilities"):
            if not isinstance(raw.get(obj, {}), dict):
                raise ConfigError(f"{where}: {obj} must be a JSON object")
        return cls(**raw)

    def check(self, settings: Settings) -> list[str]:
        """Refuse what the worker would refuse; return warnings (literal secrets)."""
        try:
            adapter = get_adapter(self.type)
        except Exception as exc:
            raise ConfigError(f"provider {self.name}: unknown type {self.type!r}") from exc
        settings.provider_allowlist.check_base_url(
            self.name, self.base_url, official_base_urls(adapter)
        )
        warnings = []
        for label, value in (("api_key", self.api_key), ("webhook_secret", self.webhook_secret)):
            if value is None:
                continue
            if value.startswith(ENV_PREFIX):
                name = value[len(ENV_PREFIX) :]
                if not settings.provider_allowlist.allows_env(name):
                    raise ConfigError(
                        f"provider {self.name}: {label} names {name}, which the worker may not"
                        " read (CALLQ_PROVIDER_ENV_PREFIXES / CALLQ_PROVIDER_ENV_NAMES)"
                    )
            else:
                warnings.append(f"provider {self.name}: {label} stored as a literal; prefer env:")
        if not 1 <= self.max_concurrent_calls <= 10_000:
            raise ConfigError(f"provider {self.name}: max_concurrent_calls must be 1..10000")
        if not 1 <= self.priority <= 100:
            raise ConfigError(f"provider {self.name}: priority must be 1..100")
        return warnings


UPSERT = """
INSERT INTO call_service_providers AS p (name, provider_type, base_url, api_key, webhook_secret,
                                         max_concurrent_calls, priority, config, capabilities,
                                         is_active)
VALUES (%(name)s, %(type)s, %(base_url)s, %(api_key)s, %(webhook_secret)s,
        %(max_concurrent_calls)s, %(priority)s, %(config)s, %(capabilities)s, %(is_active)s)
ON CONFLICT (name) DO UPDATE
   SET provider_type = EXCLUDED.provider_type, base_url = EXCLUDED.base_url,
       api_key = EXCLUDED.api_key, webhook_secret = EXCLUDED.webhook_secret,
       max_concurrent_calls = EXCLUDED.max_concurrent_calls, priority = EXCLUDED.priority,
       config = EXCLUDED.config, capabilities = EXCLUDED.capabilities,
       is_active = EXCLUDED.is_active
RETURNING id, (xmax = 0) AS inserted
"""
AVAILABILITY = """
INSERT INTO provider_availability (provider_id, current_calls, available_slots, status)
VALUES (%(id)s, 0, %(slots)s, 'online') ON CONFLICT (provider_id) DO NOTHING
"""


def upsert(conn: psycopg.Connection[Any], spec: ProviderSpec) -> str:
    """Insert or update one provider and its availability row; "added" or "updated".

    The database checks a caller-ID pool (``config.caller_ids``, CQ053) and lays out the
    provider's slots; a refused pool is a ConfigError naming the provider."""
    params = {**spec.__dict__, "config": json.dumps(spec.config),
              "capabilities": json.dumps(spec.capabilities)}  # fmt: skip
    try:
        row = conn.execute(UPSERT, params).fetchone()
    except psycopg.Error as exc:
        if exc.sqlstate == "CQ053":
            raise ConfigError(f"provider {spec.name}: {exc.diag.message_primary}") from exc
        raise
    assert row is not None
    conn.execute(AVAILABILITY, {"id": row[0], "slots": spec.max_concurrent_calls})
    return "added" if row[1] else "updated"


def load_specs(source: str | None) -> list[ProviderSpec]:
    """Providers from a JSON file, ``-`` (stdin) or ``$CALLQ_PROVIDERS``."""
    if source is None:
        text, where = os.environ.get("CALLQ_PROVIDERS"), "CALLQ_PROVIDERS"
        if not text:
            raise ConfigError("give a JSON file, - for stdin, or set CALLQ_PROVIDERS")
    elif source == "-":
        text, where = sys.stdin.read(), "stdin"
    else:
        try:
            with open(source) as f:
                text, where = f.read(), source
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read ({exc.strerror})") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON (line {exc.lineno})") from exc
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: must be a JSON list of providers")
    return [ProviderSpec.from_mapping(r, f"{where}[{i}]") for i, r in enumerate(raw)]


def apply(conn: psycopg.Connection[Any], specs: Sequence[ProviderSpec], settings: Settings) -> int:
    """Check every spec first, then upsert them all in one transaction; print one line each."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError("a provider name appears twice")
    warnings = [w for spec in specs for w in spec.check(settings)]
    with conn.transaction():
        done = [(spec.name, upsert(conn, spec)) for spec in specs]
    for w in warnings:
        print(f"callq: warning: {w}", file=sys.stderr)
    for name, what in done:
        print(f"{what} provider {name}")
    return 0


def list_providers(conn: psycopg.Connection[Any]) -> str:
    """Providers with their slots and state; keys shown only as their env: name or (literal)."""
    rows = conn.execute(
        "SELECT p.name, p.provider_type, p.base_url, CASE WHEN p.api_key LIKE 'env:%%'"
        " THEN p.api_key ELSE '(literal)' END, p.priority, p.max_concurrent_calls,"
        " l.current_calls, p.is_active, coalesce(pa.status, '-')"
        " FROM call_service_providers p JOIN provider_load l ON l.provider_id = p.id"
        " LEFT JOIN provider_availability pa ON pa.provider_id = p.id ORDER BY p.priority, p.name"
    ).fetchall()
    headers = ["name", "type", "base url", "key", "priority", "max", "in use", "active", "status"]
    return format_table(headers, rows) if rows else "(no providers)"


def disable(conn: psycopg.Connection[Any], name: str) -> int:
    """Stop new calls to a provider (its live calls finish)."""
    cur = conn.execute(
        "UPDATE call_service_providers SET is_active = false WHERE name = %s", (name,)
    )
    if cur.rowcount == 0:
        raise ConfigError(f"no provider named {name!r}")
    print(f"disabled provider {name}")
    return 0
