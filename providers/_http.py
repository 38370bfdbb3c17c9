"""The one send path every adapter uses: timeouts, throttle, retries and error mapping.

Foreign exceptions (httpx, tenacity) are translated here and nowhere else. The rule for creates:
a create is re-sent only when the error proves it never reached the provider (connect error,
429); after a read timeout, a 5xx or a broken response it raises
``ProviderOutcomeUnknownError`` and the caller reconciles with ``find_call``.
"""

from __future__ import annotations

import email.utils
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import tenacity

from providers.base import ProviderConfig
from providers.errors import (
    ProviderError,
    ProviderOutcomeUnknownError,
    ProviderPermanentError,
    ProviderRetryableError,
    ProviderThrottledError,
)

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 15.0
MAX_ATTEMPTS = 3
MAX_RETRY_SECONDS = 10.0
MAX_IN_PROCESS_RETRY_AFTER = 5.0  # longer waits go back to the queue

_NEVER_ARRIVED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_DIGITS = re.compile(r"\+?\d[\d\s().-]{4,}\d")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\- ]+")


class TokenBucket:
    """Thread-safe pacing: at most ``rate`` acquisitions per second, bursts up to ``burst``."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._interval = 1.0 / rate
        self._burst_span = (burst - 1) * self._interval
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep

    def acquire(self, max_wait: float | None = None) -> float | None:
        """Block until a token is free; returns the seconds waited.

        With ``max_wait``, a token that would need a longer wait is not taken: None, at once.
        """
        with self._lock:
            now = self._clock()
            slot = max(now - self._burst_span, self._next)
            wait = max(0.0, slot - now)
            if max_wait is not None and wait > max_wait:
                return None
            self._next = slot + self._interval
        if wait > 0:
            self._sleep(wait)
        return wait

    def wait_needed(self) -> float:
        """Seconds the next token would wait now (nothing is taken)."""
        with self._lock:
            now = self._clock()
            return max(0.0, max(now - self._burst_span, self._next) - now)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def safe_code(text: object, limit: int = 120) -> str:
    """A short error code from provider text, with digit runs (phone numbers) removed."""
    raw = text if isinstance(text, str) else json.dumps(text, default=str, sort_keys=True)
    cleaned = _UNSAFE.sub(" ", _DIGITS.sub("#", raw)).strip()
    return re.sub(r"\s+", " ", cleaned)[:limit] or "unknown"


def error_code(response: httpx.Response) -> str:
    """An error code from a Vapi (``message``/``error``) or SynthFlow (``detail``) error body."""
    try:
        body = response.json()
    except ValueError:
        return f"http_{response.status_code}"
    if not isinstance(body, Mapping):
        return f"http_{response.status_code}"
    detail = body.get("detail")
    if isinstance(detail, Mapping):
        detail = detail.get("category") or detail.get("description") or detail.get("status")
    elif isinstance(detail, list) and detail and isinstance(detail[0], Mapping):
        loc = detail[0].get("loc") or []
        detail = f"{detail[0].get('type', 'invalid')} {'.'.join(str(p) for p in loc)}"
    message = body.get("message")
    if isinstance(message, list):
        message = "; ".join(str(m) for m in message[:3])
    chosen = detail or message or body.get("error") or body.get("reason")
    return safe_code(chosen) if chosen else f"http_{response.status_code}"


class Sender:
    """Sends requests for one provider through one ``httpx.Client``."""

    def __init__(
        self,
        provider: str,
        client: httpx.Client,
        *,
        headers: Mapping[str, str],
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        creates_per_second: float | None = None,
        max_create_wait: float | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        max_retry_seconds: float = MAX_RETRY_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.provider = provider
        self.client = client
        self._headers = dict(headers)
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._throttle = (
            TokenBucket(creates_per_second, sleep=sleep) if creates_per_second else None
        )
        self._max_create_wait = max_create_wait
        self._max_attempts = max_attempts
        self._max_retry_seconds = max_retry_seconds
        self._sleep = sleep

    @classmethod
    def for_config(
        cls,
        provider: str,
        client: httpx.Client,
        config: ProviderConfig,
        default_creates_per_second: float | None = None,
    ) -> Sender:
        """The bearer-authenticated sender a provider row describes (timeouts, create rate)."""
        rate = config.number("creates_per_second", default_creates_per_second)
        connect = config.number("connect_timeout", None) or DEFAULT_CONNECT_TIMEOUT
        read = config.number("read_timeout", None) or DEFAULT_READ_TIMEOUT
        return cls(
            provider,
            client,
            headers={
                "Authorization": f"Bearer {config.api_key.get_secret_value()}",
                "Accept": "application/json",
            },
            connect_timeout=connect,
            read_timeout=read,
            creates_per_second=rate if rate and rate > 0 else None,
            max_create_wait=max_create_wait(config.dial_lease_seconds, connect, read),
        )

    def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        create: bool = False,
        retry: bool = True,
        auth: bool = True,
    ) -> httpx.Response:
        """Send and return a 2xx response, or raise a ``ProviderError`` subclass.

        ``create=True`` marks a non-idempotent request (see the module docstring).
        """
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._max_attempts if retry else 1)
            | tenacity.stop_after_delay(self._max_retry_seconds),
            wait=_wait,
            retry=tenacity.retry_if_exception(_should_retry),
            sleep=self._sleep,
            reraise=True,
        )
        headers = self._headers if auth else {"Accept": "application/json"}
        for attempt in retrying:
            with attempt:
                if create and self._throttle is not None:
                    self._wait_for_create_slot(self._throttle)
                return self._send_once(method, url, headers, json_body, params, create)
        raise AssertionError("unreachable")  # pragma: no cover - tenacity reraises

    def _wait_for_create_slot(self, throttle: TokenBucket) -> None:
        """Take a create token, or refuse (nothing sent) when the wait is longer than allowed."""
        if throttle.acquire(self._max_create_wait) is None:
            raise ProviderThrottledError(
                "create throttle wait exceeds the dialing lease",
                provider=self.provider,
                code="client_throttle",
                retry_after=throttle.wait_needed(),
            )

    def _send_once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        json_body: Any,
        params: Mapping[str, Any] | None,
        create: bool,
    ) -> httpx.Response:
        request = self.client.build_request(
            method, url, headers=headers, json=json_body, params=params, timeout=self._timeout
        )
        try:
            response = self.client.send(request)
        except _NEVER_ARRIVED as exc:
            raise ProviderRetryableError(
                "could not connect", provider=self.provider, code=type(exc).__name__
            ) from exc
        except httpx.HTTPError as exc:
            cls = ProviderOutcomeUnknownError if create else ProviderRetryableError
            raise cls(
                "no complete response", provider=self.provider, code=type(exc).__name__
            ) from exc
        if response.is_success:
            return response
        raise self._status_error(response, create)

    def _status_error(self, response: httpx.Response, create: bool) -> ProviderError:
        status = response.status_code
        code = error_code(response)
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return ProviderRetryableError(
                "rate limited", provider=self.provider, http_status=status, code=code,
                retry_after=retry_after,
            )  # fmt: skip
        if status >= 500 or status == 408:
            cls = ProviderOutcomeUnknownError if create else ProviderRetryableError
            return cls("provider failure", provider=self.provider, http_status=status, code=code)
        return ProviderPermanentError(
            "request rejected", provider=self.provider, http_status=status, code=code
        )

    def json(self, response: httpx.Response, *, create: bool = False) -> Any:
        """The decoded body; a body we cannot read after a create is outcome-unknown."""
        try:
            return response.json()
        except ValueError as exc:
            cls = ProviderOutcomeUnknownError if create else ProviderRetryableError
            raise cls(
                "unreadable response body", provider=self.provider,
                http_status=response.status_code, code="bad_json",
            ) from exc  # fmt: skip


def max_create_wait(lease: float | None, connect: float, read: float) -> float | None:
    """The longest a create may wait in the throttle: the dialing lease minus the request's own
    timeouts, so the create is sent, and answered, before the reaper may take the call back
    (and reconcile, then fail it over: a second dial). None when no lease applies."""
    if lease is None:
        return None
    return max(0.0, lease - connect - read)


def _should_retry(exc: BaseException) -> bool:
    if not isinstance(exc, ProviderRetryableError) or isinstance(exc, ProviderThrottledError):
        return False
    return exc.retry_after is None or exc.retry_after <= MAX_IN_PROCESS_RETRY_AFTER


_jitter = tenacity.wait_random_exponential(multiplier=0.25, max=2.0)


def _wait(state: tenacity.RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, ProviderError) and exc.retry_after is not None:
        return exc.retry_after
    return float(_jitter(state))


def timed(fn: Callable[[], object]) -> tuple[float, BaseException | None]:
    """Run ``fn``; return elapsed milliseconds and the exception it raised, if any."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as exc:
        return (time.perf_counter() - start) * 1000.0, exc
    return (time.perf_counter() - start) * 1000.0, None
