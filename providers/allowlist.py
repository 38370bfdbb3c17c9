"""What a provider row may make the worker do with its own secrets.

A ``call_service_providers`` row is data; the worker's environment and its keys are not. Two
rules keep them apart:

- **Endpoints.** Each adapter declares the base URLs of its official API
  (``official_base_urls``); a row's ``base_url`` must have one of their origins (scheme, host,
  port) or one that ops allow in the worker's settings (``CALLQ_PROVIDER_ALLOWED_HOSTS``, e.g. the
  simulator's). Anything else is a :class:`ConfigError` before a request is built.
- **``env:NAME`` references.** Only names with an allowed prefix (default ``CALLQ_SECRET_``) or
  on an explicit list resolve. The worker's own connection URLs never do.

Errors name the field, the reference or the provider id, never a value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from pydantic import SecretStr

from providers.errors import ConfigError

ENV_PREFIX = "env:"
DEFAULT_ENV_PREFIXES = ("CALLQ_SECRET_",)
# The worker's own connections: never resolvable from a row, whatever ops allow.
NEVER_RESOLVED = frozenset(
    {"DATABASE_URL", "CALLQ_DATABASE_URL", "CALLQ_BROKER_URL", "CELERY_BROKER_URL", "BROKER_URL"}
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = -1
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"^({_LABEL}(\.{_LABEL})*|[0-9a-f:.]*:[0-9a-f:.]*)$")

Origin = tuple[str, str, int]


def parse_origin(text: str) -> Origin:
    """``scheme://host[:port]`` (``:*`` for any port; no scheme means https) as a tuple.

    Raises ``ValueError`` naming the entry (an ops setting, never a secret).
    """
    raw = text.strip()
    if "://" not in raw:
        raw = f"https://{raw}"
    scheme, _, rest = raw.partition("://")
    hostport = rest.split("/", 1)[0]
    any_port = hostport.endswith(":*")
    if any_port:
        hostport = hostport[:-2]
    try:
        url = httpx.URL(f"{scheme}://{hostport}")
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a host or origin: {text!r}") from exc
    if not _plain(url):
        raise ValueError(f"not an http(s) host or origin: {text!r}")
    port = ANY_PORT if any_port else (url.port or _DEFAULT_PORTS[url.scheme])
    return url.scheme, url.host.lower(), port


def origin_of(base_url: str) -> Origin | None:
    """The origin a request to ``base_url`` goes to, or None when it is not an http(s) URL."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError):
        return None
    if not _plain(url):
        return None
    return url.scheme, url.host.lower(), url.port or _DEFAULT_PORTS[url.scheme]


@dataclass(frozen=True)
class Allowlist:
    """The hosts and environment names ops allow, on top of each adapter's official hosts."""

    origins: frozenset[Origin] = frozenset()
    env_prefixes: tuple[str, ...] = DEFAULT_ENV_PREFIXES
    env_names: frozenset[str] = frozenset()

    @classmethod
    def from_settings(
        cls,
        hosts: Iterable[str] = (),
        env_prefixes: Iterable[str] = DEFAULT_ENV_PREFIXES,
        env_names: Iterable[str] = (),
    ) -> Allowlist:
        """Build from the worker's settings (``ValueError`` for an entry that is not a host)."""
        prefixes = tuple(p.strip() for p in env_prefixes if p.strip())
        return cls(
            origins=frozenset(parse_origin(h) for h in hosts if h.strip()),
            env_prefixes=prefixes,
            env_names=frozenset(n.strip() for n in env_names if n.strip()),
        )

    def allows_env(self, name: str) -> bool:
        """True when a row may name the environment variable ``name``."""
        if name in NEVER_RESOLVED:
            return False
        return name in self.env_names or any(name.startswith(p) for p in self.env_prefixes)

    def allows_origin(self, origin: Origin, official: Iterable[str]) -> bool:
        """True when ``origin`` is an official one or one that ops allow."""
        scheme, host, _ = origin
        if origin in {origin_of(url) for url in official}:
            return True
        return origin in self.origins or (scheme, host, ANY_PORT) in self.origins

    def check_base_url(
        self, provider_id: str, base_url: str | None, official: Iterable[str]
    ) -> None:
        """Refuse a ``base_url`` outside the official and allowed hosts (no request is built)."""
        if base_url is None:
            return
        origin = origin_of(base_url)
        if origin is None or not self.allows_origin(origin, official):
            raise ConfigError(
                f"provider {provider_id}: base_url is not an official host of its provider type"
                " nor one allowed in CALLQ_PROVIDER_ALLOWED_HOSTS"
            )

    def resolve(self, value: object, field_name: str) -> SecretStr | None:
        """A literal or ``env:NAME`` value as a secret; None when empty.

        Raises :class:`ConfigError` naming the field and the reference, never a value.
        """
        if value is None or value == "":
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        if not text.startswith(ENV_PREFIX):
            return SecretStr(text)
        name = text[len(ENV_PREFIX) :].strip()
        if not name:
            raise ConfigError(f"{field_name}: 'env:' names no variable")
        if not self.allows_env(name):
            raise ConfigError(
                f"{field_name}: env:{_printable(name)} is not an allowed secret name"
                " (CALLQ_PROVIDER_ENV_PREFIXES, CALLQ_PROVIDER_ENV_NAMES)"
            )
        found = os.environ.get(name)
        if not found:
            raise ConfigError(f"{field_name}: environment variable {_printable(name)} is not set")
        return SecretStr(found)


def _plain(url: httpx.URL) -> bool:
    """An http(s) URL with a plain host name or IP address and no user info."""
    host = url.host.lower()
    return url.scheme in _DEFAULT_PORTS and not url.userinfo and bool(_HOST.match(host))


def _printable(name: str, limit: int = 80) -> str:
    """A reference as it may appear in an error: printable ASCII, bounded."""
    cleaned = "".join(c if c.isascii() and c.isprintable() else "?" for c in name)
    return cleaned[:limit] + ("..." if len(cleaned) > limit else "")
