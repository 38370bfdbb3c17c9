"""The errors callq raises, shaped by what the caller does next.

::

    CallqError
      ConfigError                    a setting or provider row is wrong: fix the configuration
      ProviderError(provider, http_status, code, retry_after)
        ProviderRetryableError       rate limited, or refused before the request arrived
          ProviderThrottledError     our own create throttle would wait past the dialing
                                     lease: nothing was sent, release the call for later
        ProviderPermanentError       invalid number, bad request, bad credentials: do not retry
        ProviderOutcomeUnknownError  the create may have arrived: reconcile, never re-send
          ProviderUnprovenMatchError a lookup saw a call that may be ours, without proof:
                                     neither adopt it nor dial again
      WebhookError
        WebhookAuthError             the request is not authenticated: answer 401
        WebhookPayloadError          the body is malformed: answer 400

Messages never carry phone numbers, scripts or keys.
"""

from __future__ import annotations


class CallqError(Exception):
    """Base class of every error callq raises on purpose."""


class ConfigError(CallqError):
    """A setting or a provider row is missing or malformed."""


class ProviderError(CallqError):
    """A provider API call failed."""

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        http_status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.http_status = http_status
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = [super().__str__()]
        if self.provider:
            parts.append(f"provider={self.provider}")
        if self.http_status is not None:
            parts.append(f"http_status={self.http_status}")
        if self.code:
            parts.append(f"code={self.code}")
        return " ".join(parts)


class ProviderRetryableError(ProviderError):
    """Try again later (honour ``retry_after``); the request provably had no effect."""


class ProviderThrottledError(ProviderRetryableError):
    """The client-side create throttle would wait longer than allowed: no request was sent.
    ``retry_after`` is the wait it would have needed."""


class ProviderPermanentError(ProviderError):
    """Retrying cannot help: the request or the account is wrong."""


class ProviderOutcomeUnknownError(ProviderError):
    """The request may have taken effect: look the call up before anything is re-sent."""


class ProviderUnprovenMatchError(ProviderOutcomeUnknownError):
    """A lookup found a call that may be ours but carries no proof (no echoed correlation id):
    it may be another tenant's. Never adopt it; never dial again while it is there."""


class WebhookError(CallqError):
    """A webhook request could not be accepted."""


class WebhookAuthError(WebhookError):
    """The webhook request failed authentication."""


class WebhookPayloadError(WebhookError):
    """The webhook body is not a payload we understand."""
