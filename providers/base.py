"""The provider port: the plain types that cross it and the ``Provider`` protocol.

Adapters translate between these types and one provider's HTTP API; nothing here does I/O.
Phone numbers, names, scripts and keys are kept out of every ``repr``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError

from providers.allowlist import ENV_PREFIX, Allowlist
from providers.errors import ConfigError

# How old a signed webhook may be, and how long a delivery is remembered to refuse its replay.
REPLAY_WINDOW_SECONDS = 300.0


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
    """One ``call_service_providers`` row as the adapter needs it; keys are ``SecretStr``.

    ``env:NAME`` values resolve only through the :class:`Allowlist` the row was read with.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", hide_input_in_errors=True)

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
    # Set by the worker, never read from a row: how long a dialing call may go before the
    # reaper takes it back (bounds the client-side create throttle's wait).
    dial_lease_seconds: float | None = None
    _allowlist: Allowlist = PrivateAttr(default_factory=Allowlist)

    @classmethod
    def from_row(
        cls, row: Mapping[str, Any] | object, allowlist: Allowlist | None = None
    ) -> ProviderConfig:
        """Build from a row mapping (or ORM object); every ``env:NAME`` value is checked now.

        Raises :class:`ConfigError` naming the provider id, the field or the reference, never a
        value.
        """
        get = row.get if isinstance(row, Mapping) else lambda k, d=None: getattr(row, k, d)
        allow = allowlist or Allowlist()
        provider_id = str(get("id") or "")
        provider_type = get("provider_type")
        if not provider_type:
            raise ConfigError(f"provider {provider_id}: no provider_type")
        api_key = allow.resolve(get("api_key"), "api_key")
        if api_key is None:
            raise ConfigError(f"provider {provider_id}: api_key is empty")
        config = get("config") or {}
        if not isinstance(config, Mapping):
            raise ConfigError(f"provider {provider_id}: config is not an object")
        for key, value in config.items():
            if isinstance(value, str) and value.startswith(ENV_PREFIX):
                allow.resolve(value, f"config.{key}")
        try:
            built = cls(
                id=provider_id,
                name=str(get("name") or ""),
                provider_type=str(provider_type),
                api_key=api_key,
                api_secret=allow.resolve(get("api_secret"), "api_secret"),
                webhook_secret=allow.resolve(get("webhook_secret"), "webhook_secret"),
                base_url=get("base_url") or None,
                max_concurrent_calls=get("max_concurrent_calls"),
                config=dict(config),
                capabilities=dict(get("capabilities") or {}),
                dial_lease_seconds=get("dial_lease_seconds"),
            )
        except ValidationError as exc:
            fields = sorted({str(e["loc"][0]) for e in exc.errors() if e.get("loc")})
            raise ConfigError(f"provider {provider_id}: invalid {', '.join(fields)}") from None
        built._allowlist = allow
        return built

    @property
    def allowlist(self) -> Allowlist:
        """The hosts and environment names this row was read with."""
        return self._allowlist

    def setting(self, key: str, default: Any = None) -> Any:
        """An adapter setting from ``config`` (``env:NAME`` values resolved), or ``default``."""
        value = self.config.get(key, default)
        if isinstance(value, str) and value.startswith(ENV_PREFIX):
            secret = self._allowlist.resolve(value, f"config.{key}")
            return default if secret is None else secret.get_secret_value()
        return value

    def number(self, key: str, default: float | None) -> float | None:
        """A numeric setting; a value that is not a finite number is a ConfigError naming
        ``key``, never showing the value."""
        value = self.setting(key, default)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"provider {self.id}: config.{key} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"provider {self.id}: config.{key} is not a finite number")
        return number

    def webhook_key(self) -> SecretStr | None:
        """The secret that authenticates this provider's webhooks: the ``webhook_secret``
        column, else ``api_secret``."""
        return self.webhook_secret or self.api_secret


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


# Bounds of believable provider data (``clamp_status``): anything outside is treated as unknown.
MAX_CALL_SECONDS = 86_400.0  # a day; Vapi caps a call at 12 hours
MAX_CALL_COST = 10_000.0
MAX_TEXT_CHARS = 1_000_000  # a transcript longer than this is cut
MAX_URL_CHARS = 2_048
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_FUTURE_WINDOW = timedelta(days=1)


def clamp_status(status: CallStatus, *, now: datetime | None = None) -> CallStatus:
    """``status`` with provider data the database will accept: finite, in range, ordered.

    The boundary's guarantee: a duration in ``[0, MAX_CALL_SECONDS]``, a cost in
    ``[0, MAX_CALL_COST]``, times between 2000 and a day from now, an end only with a start
    and never before it, bounded texts; anything else becomes unknown (None). Idempotent.
    """
    now = now or datetime.now(UTC)
    started = _believable_time(status.started_at, now)
    ended = _believable_time(status.ended_at, now) if started is not None else None
    duration = _in_range(status.duration_seconds, MAX_CALL_SECONDS)
    if started is not None and status.state.is_terminal:
        if ended is None or ended < started:
            span = duration if duration is not None else 0.0
            ended = started + timedelta(seconds=span)
        if duration is None:
            duration = _in_range((ended - started).total_seconds(), MAX_CALL_SECONDS)
    elif started is not None and ended is not None and ended < started:
        ended = None
    return replace(
        status,
        started_at=started,
        ended_at=ended,
        duration_seconds=duration,
        cost=_in_range(status.cost, MAX_CALL_COST),
        transcript=_bounded(status.transcript, MAX_TEXT_CHARS),
        recording_url=_bounded(status.recording_url, MAX_URL_CHARS, cut=False),
        ended_reason=_bounded(status.ended_reason, 500),
        correlation_id=_bounded(status.correlation_id, 200, cut=False),
        provider_status=_bounded(status.provider_status, 100),
    )


def _in_range(value: object, maximum: float) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0.0 <= number <= maximum else None


def _believable_time(value: object, now: datetime) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    when = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return when if _EARLIEST <= when <= now + _FUTURE_WINDOW else None


def _bounded(value: object, limit: int, *, cut: bool = True) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("\x00", "")  # PostgreSQL text cannot hold NUL
    if len(text) <= limit:
        return text
    return text[:limit] if cut else None


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
