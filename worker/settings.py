"""The one typed configuration object, read from the environment and an optional ``.env``."""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from providers.allowlist import DEFAULT_ENV_PREFIXES, Allowlist, parse_origin

# A list read from one variable as comma-separated text (JSON lists are accepted too).
CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every knob of a callq process. Environment names are ``CALLQ_<FIELD>`` unless noted."""

    model_config = SettingsConfigDict(
        env_prefix="CALLQ_", env_file=".env", env_nested_delimiter="__", extra="ignore"
    )

    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("CALLQ_DATABASE_URL", "DATABASE_URL")
    )
    broker_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CALLQ_BROKER_URL", "CELERY_BROKER_URL", "BROKER_URL"),
    )
    db_pool_size: int = Field(default=16, ge=1, le=200)
    # Behind a transaction pooler (Supabase's port 6543, pgbouncer transaction mode): no
    # prepared statements, no session state, no LISTEN. None: tell from the URL (port 6543 or
    # ?pgbouncer=true).
    database_pooler: bool | None = None
    # A direct (not pooled) URL for LISTEN/NOTIFY; without it, LISTEN is off behind a pooler
    # and beat's tick claims the calls.
    listen_database_url: str | None = None

    # Claiming (beat + LISTEN/NOTIFY wake-ups)
    poll_interval_seconds: float = Field(default=2.0, gt=0)
    claim_batch_size: int = Field(default=100, ge=1, le=5000)
    claim_max_batches: int = Field(default=20, ge=1)
    lease_seconds: int = Field(default=120, ge=5)
    listen_enabled: bool = True
    # Which process listens: "worker" (one worker per fleet holds the listener and claims in
    # its own process, no broker message per wake-up) or "beat" (beat sends a callq.poll).
    listen_in: Literal["worker", "beat"] = "worker"
    # At most one claim per this many seconds from the listener (a burst of notifications is
    # one claim); a standby worker tries to take the listener over this often.
    listen_min_interval_seconds: float = Field(default=0.02, ge=0, le=1)
    listen_standby_seconds: float = Field(default=5.0, gt=0)
    # What the listener claims while the calls of its earlier claims are still being placed (a
    # backlog drains): a small batch, which the fair order fills with each waiting tenant's
    # first calls. The backlog itself is claimed by its chained polls, as fast as it is placed.
    listen_busy_batch_size: int = Field(default=10, ge=1, le=5000)

    # Tracking placed calls
    track_initial_delay_seconds: float = Field(default=2.0, ge=0)
    # Polls of a 60-s call fall at about 2, 5, 10, 18, 27, 35, 44, 52 and 61 s (each wait counted
    # from the poll before, plus up to one tick): its end is seen within about 9 s with about 9
    # reads. A provider that sends webhooks is polled only as a safety net.
    track_max_delay_seconds: float = Field(default=8.0, gt=0, le=30)
    track_webhook_delay_seconds: float = Field(default=30.0, gt=0, le=30)
    track_backoff_factor: float = Field(default=1.6, ge=1)
    # The tracking tick: each tick polls the placed calls whose next poll is due.
    track_tick_seconds: float = Field(default=1.0, gt=0)
    # True: the leading worker (the one whose listener holds the lock; threads or solo pool)
    # runs the tracking tick in its own process when beat wakes it (NOTIFY), with no broker
    # message; beat's message then only steps in for a poll overdue by track_fallback_seconds
    # (worker/listener.py). A chunk whose tracking fails in process goes on as a track_batch
    # message, so a failure that persists is a failed task in Flower all the same.
    track_in_worker: bool = True
    track_fallback_seconds: float = Field(default=5.0, ge=0, le=300)
    track_tick_limit: int = Field(default=2000, ge=1)
    # While the worker process that runs a tick is placing a burst (runtime.is_placing), the
    # tick takes only the polls overdue by this much: a burst is placed before the polls of
    # calls that can wait a few seconds take its cores. 0: the tick takes every due poll.
    track_defer_seconds: float = Field(default=3.0, ge=0, le=30)
    reconcile_lookups: int = Field(default=3, ge=1)
    reconcile_delay_seconds: float = Field(default=5.0, ge=0)

    # Maintenance
    health_interval_seconds: float = Field(default=30.0, gt=0)
    reaper_interval_seconds: float = Field(default=30.0, gt=0)
    rollover_interval_seconds: float = Field(default=3600.0, gt=0)
    # The call-event log's retention (public.prune_call_events), applied by beat.
    event_retention_days: float = Field(default=90.0, ge=1 / 24)
    event_prune_interval_seconds: float = Field(default=3600.0, gt=0)

    # Broker
    visibility_timeout_seconds: int = Field(default=3600, ge=60)
    worker_concurrency: int = Field(default=16, ge=1)
    worker_pool: str = "threads"
    # Task events cost a broker message each; Flower switches them on while it watches.
    task_events: bool = False
    # Claimed calls are sent to the workers in chunks (one message per chunk) and placed
    # concurrently inside the chunk.
    dispatch_chunk_size: int = Field(default=50, ge=1, le=500)
    dispatch_threads: int = Field(default=16, ge=1, le=256)

    # Providers
    http_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    http_read_timeout_seconds: float = Field(default=15.0, gt=0)
    # Hosts a provider row may point at besides its type's official API (the simulator, a
    # proxy): "http://127.0.0.1:8765", "http://simulator:*" (any port), "api.example.com".
    provider_allowed_hosts: CommaList = Field(default_factory=list)
    # Which environment variables an "env:NAME" value in a provider row may name.
    provider_env_prefixes: CommaList = Field(default_factory=lambda: list(DEFAULT_ENV_PREFIXES))
    provider_env_names: CommaList = Field(default_factory=list)

    # Webhooks
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(default=8080, ge=0, le=65535)
    webhook_public_url: str | None = None
    # Bounds of the endpoint (worker/webhooks.py, worker/http_protocol.py).
    webhook_max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    webhook_max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    webhook_header_timeout_seconds: float = Field(default=5.0, gt=0)
    webhook_body_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_keepalive_seconds: int = Field(default=5, ge=1)
    webhook_max_connections: int = Field(default=512, ge=1)
    webhook_secret_ttl_seconds: float = Field(default=10.0, gt=0)
    # Calls the webhook server ends at once (each ending is about 2 ms of database CPU; more at
    # once only wait on each other's counter rows: bench/notes/tracking_session7.md)
    webhook_end_threads: int = Field(default=4, ge=1, le=64)

    # Notifications to the apps (call.ended): the outbox is drained on beat by the "notify"
    # queue, which runs in its own worker (callq worker -Q notify) so a slow receiver never
    # holds a thread that places or tracks calls.
    notify_interval_seconds: float = Field(default=2.0, gt=0)
    notify_batch_size: int = Field(default=50, ge=1, le=1000)
    notify_lease_seconds: int = Field(default=60, ge=10)
    notify_connect_timeout_seconds: float = Field(default=3.0, gt=0)
    notify_read_timeout_seconds: float = Field(default=5.0, gt=0)
    # deliver to loopback/private/link-local addresses and plain http (tests, the simulator)
    notify_allow_private: bool = False

    log_level: str = "INFO"
    log_json: bool = True

    def pooled(self) -> bool:
        """Whether the database URL goes through a transaction pooler."""
        from models.session import is_pooled

        return bool(self.database_url) and is_pooled(str(self.database_url), self.database_pooler)

    def listen_url(self) -> str | None:
        """Where LISTEN runs: the direct listen URL, else the database URL unless pooled."""
        if self.listen_database_url:
            return self.listen_database_url
        return None if self.pooled() else self.database_url

    @field_validator("provider_allowed_hosts", "provider_env_prefixes", "provider_env_names",
                     mode="before")  # fmt: skip
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("provider_allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_origin(entry)  # ValueError names the entry
        return value

    @cached_property
    def provider_allowlist(self) -> Allowlist:
        """Hosts and secret names provider rows may use (see providers/allowlist.py)."""
        return Allowlist.from_settings(
            self.provider_allowed_hosts, self.provider_env_prefixes, self.provider_env_names
        )

    def require_database_url(self) -> str:
        """The configured database URL, or a ConfigError naming the variable."""
        from providers.errors import ConfigError

        if not self.database_url:
            raise ConfigError("DATABASE_URL (or CALLQ_DATABASE_URL) is not set")
        return self.database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, built on first use (tests build their own ``Settings``)."""
    return Settings()
