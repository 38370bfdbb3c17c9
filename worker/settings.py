"""The one typed configuration object, read from the environment and an optional ``.env``."""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    # Claiming (beat + LISTEN/NOTIFY wake-ups)
    poll_interval_seconds: float = Field(default=2.0, gt=0)
    claim_batch_size: int = Field(default=100, ge=1, le=5000)
    claim_max_batches: int = Field(default=20, ge=1)
    lease_seconds: int = Field(default=120, ge=5)
    listen_enabled: bool = True

    # Tracking placed calls
    track_initial_delay_seconds: float = Field(default=2.0, ge=0)
    track_max_delay_seconds: float = Field(default=30.0, gt=0)
    track_backoff_factor: float = Field(default=1.6, ge=1)
    reconcile_lookups: int = Field(default=3, ge=1)
    reconcile_delay_seconds: float = Field(default=5.0, ge=0)

    # Maintenance
    health_interval_seconds: float = Field(default=30.0, gt=0)
    reaper_interval_seconds: float = Field(default=30.0, gt=0)
    rollover_interval_seconds: float = Field(default=3600.0, gt=0)

    # Broker
    visibility_timeout_seconds: int = Field(default=3600, ge=60)
    worker_concurrency: int = Field(default=16, ge=1)
    worker_pool: str = "threads"
    # Task events cost a broker message each; Flower switches them on while it watches.
    task_events: bool = False
    # Claimed calls are sent to the workers in chunks (one message per chunk) and placed
    # concurrently inside the chunk.
    dispatch_chunk_size: int = Field(default=10, ge=1, le=500)
    dispatch_threads: int = Field(default=16, ge=1, le=256)

    # Providers
    http_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    http_read_timeout_seconds: float = Field(default=15.0, gt=0)

    # Webhooks
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(default=8080, ge=0, le=65535)
    webhook_public_url: str | None = None
    webhook_shared_secret: SecretStr | None = None

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
