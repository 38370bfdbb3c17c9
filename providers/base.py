"""The provider port: the plain types that cross it and the ``Provider`` protocol.

Adapters translate between these types and one provider's HTTP API; nothing here does I/O.
Phone numbers, names, scripts and keys are kept out of every ``repr``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model
from pydantic_settings import BaseSettings

from providers.errors import ConfigError

ENV_PREFIX = "env:"


class CallState(StrEnum):
    """The unified state of a call, whatever the provider."""

    QUEUED = "queued"
    RINGING = "ringing"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    VOICEMAIL = "voicemail"
    FAILED_RETRYABLE = "failed_retryable"
    FAILED_PERMANENT = "failed_permanent"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """True once the call has ended (any outcome)."""
        return self not in _LIVE_STATES


_LIVE_STATES = frozenset({CallState.QUEUED, CallState.RINGING, CallState.IN_PROGRESS})


class ProviderConfig(BaseModel):
    """One ``call_service_providers`` row as the adapter needs it; keys are ``SecretStr``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    name: str = ""
    provider_type: str
    api_key: SecretStr
    api_secret: SecretStr | None = None
    webhook_secret: SecretStr | None = None
    base_url: str | None = None
    max_concurrent_calls: int | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    capabilities: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | object) -> ProviderConfig:
        """Build from a row mapping (or ORM object); ``env:NAME`` keys come from the environment.

        Raises :class:`ConfigError` naming the field or variable, never its value.
        """
        get = row.get if isinstance(row, Mapping) else lambda k, d=None: getattr(row, k, d)
        provider_type = get("provider_type")
        if not provider_type:
            raise ConfigError("provider row has no provider_type")
        api_key = _resolve_secret(get("api_key"), "api_key")
        if api_key is None:
            raise ConfigError(f"provider {get('name') or get('id')!s}: api_key is empty")
        return cls(
            id=str(get("id") or ""),
            name=str(get("name") or ""),
            provider_type=str(provider_type),
            api_key=api_key,
            api_secret=_resolve_secret(get("api_secret"), "api_secret"),
            webhook_secret=_resolve_secret(get("webhook_secret"), "webhook_secret"),
            base_url=get("base_url") or None,
            max_concurrent_calls=get("max_concurrent_calls"),
            config=dict(get("config") or {}),
            capabilities=dict(get("capabilities") or {}),
        )

    def setting(self, key: str, default: Any = None) -> Any:
        """An adapter setting from ``config`` (``env:NAME`` values resolved), or ``default``."""
        value = self.config.get(key, default)
        if isinstance(value, str) and value.startswith(ENV_PREFIX):
            secret = _resolve_secret(value, key)
            return default if secret is None else secret.get_secret_value()
        return value


def _resolve_secret(value: object, field_name: str) -> SecretStr | None:
    if value is None or value == "":
        return None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    text = str(value)
    if not text.startswith(ENV_PREFIX):
        return SecretStr(text)
    var = text[len(ENV_PREFIX) :].strip()
    if not var:
        raise ConfigError(f"{field_name}: 'env:' names no variable")
    found = _read_env(var)
    if found is None:
        raise ConfigError(f"{field_name}: environment variable {var} is not set")
    return found


def _read_env(var: str) -> SecretStr | None:
    """Read one variable through pydantic-settings (same rules as the worker's settings)."""
    if var not in os.environ and var.upper() not in os.environ and var.lower() not in os.environ:
        return None
    model = create_model(
        "EnvSecret",
        __base__=BaseSettings,
        value=(SecretStr | None, Field(default=None, validation_alias=var)),
    )
    settings: Any = model()
    secret: SecretStr | None = settings.value
    if secret is None or not secret.get_secret_value():
        return None
    return secret


class VoicemailAction(StrEnum):
    """What the agent does when the call reaches a voicemail box."""

    HANG_UP = "hang_up"
    LEAVE_MESSAGE = "leave_message"


@dataclass(frozen=True, slots=True)
class VoicemailPolicy:
    """Voicemail handling for one call: detect or not, and then hang up or leave ``message``.

    ``detect=False`` means the agent treats a voicemail box like a person (no detection).
    """

    detect: bool = True
    action: VoicemailAction = VoicemailAction.HANG_UP
    message: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.action is VoicemailAction.LEAVE_MESSAGE and not (self.message or "").strip():
            raise ValueError("a voicemail policy that leaves a message needs its text")

    @property
    def leaves_message(self) -> bool:
        """True when the agent should speak ``message`` after the beep."""
        return self.detect and self.action is VoicemailAction.LEAVE_MESSAGE


@dataclass(frozen=True, slots=True)
class CallRequest:
    """What to dial: provider-neutral, built by ``dispatch`` from the queue and template rows.

    The optional features are ``None`` when the provider's own (agent or account) setting
    applies: ``max_duration_seconds`` caps the call, ``caller_id`` is the provider's outbound
    number (or number id, for Vapi) overriding the row's default, ``voicemail`` is the
    voicemail policy, ``record`` turns the recording on or off.
    """

    correlation_id: str
    to_number: str = field(repr=False)
    recipient_name: str | None = field(default=None, repr=False)
    recipient_email: str | None = field(default=None, repr=False)
    script: str | None = field(default=None, repr=False)
    first_message: str | None = field(default=None, repr=False)
    variables: dict[str, str] = field(default_factory=dict, repr=False)
    template_name: str | None = None
    queue_id: str | None = None
    max_duration_seconds: int | None = None
    caller_id: str | None = field(default=None, repr=False)
    voicemail: VoicemailPolicy | None = None
    record: bool | None = None


@dataclass(frozen=True, slots=True)
class CallHandle:
    """The provider's id for a call it accepted, and the state it reported at creation."""

    provider_call_id: str
    state: CallState = CallState.QUEUED


@dataclass(frozen=True, slots=True)
class CallStatus:
    """A call's current state in unified terms (times are timezone-aware UTC).

    ``answered`` is True when a person may have talked to the agent: never redial such a call
    automatically, even when ``state`` is ``failed_retryable``.
    """

    provider_call_id: str
    state: CallState
    ended_reason: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: float | None = None
    cost: float | None = None
    recording_url: str | None = field(default=None, repr=False)
    transcript: str | None = field(default=None, repr=False)
    answered: bool = False
    correlation_id: str | None = None
    provider_status: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """An authenticated webhook delivery; treat it as a hint and re-read the call."""

    provider_call_id: str
    status: CallStatus
    event_type: str


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """Result of a cheap authenticated request to the provider."""

    ok: bool
    latency_ms: float
    detail: str | None = None


@runtime_checkable
class Provider(Protocol):
    """One provider account: places calls and reports on them. Thread-safe."""

    config: ProviderConfig

    def create_call(self, req: CallRequest) -> CallHandle:
        """Place a call. Raises ``ProviderOutcomeUnknownError`` when it may have been placed:
        then call :meth:`find_call`, never ``create_call`` again."""
        ...

    def get_call(self, provider_call_id: str) -> CallStatus:
        """Fetch the call's current state (idempotent, retried on transient errors)."""
        ...

    def find_call(self, req: CallRequest, since: datetime) -> CallStatus | None:
        """Look up a call created for ``req.correlation_id`` after ``since``; None if none was."""
        ...

    def cancel_call(self, provider_call_id: str) -> bool:
        """End or unschedule the call; False when the provider offers no way to."""
        ...

    def check_health(self) -> HealthStatus:
        """One cheap authenticated request, timed; never raises for provider errors."""
        ...

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookEvent:
        """Authenticate and parse a delivery (``WebhookAuthError``/``WebhookPayloadError``)."""
        ...

    def close(self) -> None:
        """Release the HTTP connections this adapter owns."""
        ...
