"""Small helpers shared by the adapters (pure functions)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from providers.errors import ProviderError, WebhookPayloadError

T = TypeVar("T")


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names lower-cased; WSGI ``HTTP_X_Y`` names also become ``x-y``."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key.startswith("http_"):
            key = key[5:].replace("_", "-")
        out[key] = value
    return out


def parse_time(value: object) -> datetime | None:
    """An aware UTC datetime from ISO 8601 text, epoch seconds or epoch milliseconds."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
            number = float(value)
            if number > 1e11:  # milliseconds
                number /= 1000.0
            return datetime.fromtimestamp(number, UTC)
        if not isinstance(value, str):
            return None
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):  # nonsense, or out of datetime's range
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def iso(value: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z`` suffix, as Vapi writes it."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def as_float(value: object) -> float | None:
    """A float, or None for missing/unparseable values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def as_text(value: object) -> str | None:
    """A non-empty string, or None."""
    return value if isinstance(value, str) and value else None


def as_id(value: object, limit: int = 200) -> str | None:
    """A provider's id for a call: printable text of at most ``limit`` characters, or None."""
    text = as_text(value)
    if text is None or len(text) > limit or not text.isprintable():
        return None
    return text


def json_object(body: bytes) -> dict[str, Any]:
    """Decode a webhook body that must be a JSON object."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookPayloadError("body is not JSON") from exc
    if not isinstance(data, dict):
        raise WebhookPayloadError("body is not a JSON object")
    return data


def secrets_equal(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets or signatures."""
    return hmac.compare_digest(given.encode(), expected.encode())


def read_call(parse: Callable[[Mapping[str, Any]], T], item: Mapping[str, Any], provider: str) -> T:
    """``parse(item)`` for a call the provider's API returned: unreadable is a provider error
    (the text names no field value)."""
    try:
        return parse(item)
    except ValueError as exc:
        raise ProviderError("call cannot be read", provider=provider, code="bad_call") from exc
