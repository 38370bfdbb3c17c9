"""Which adapter serves a ``provider_type``: built-ins plus the ``callq.providers`` entry points.

A third-party package adds a provider with, in its ``pyproject.toml``::

    [project.entry-points."callq.providers"]
    bland = "callq_bland:BlandProvider"

The class is called as ``cls(config: ProviderConfig, client: httpx.Client | None)``. It declares
the base URLs of its provider's official API as ``official_base_urls`` (a tuple of strings); a
row pointing anywhere else needs the host in ``CALLQ_PROVIDER_ALLOWED_HOSTS``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, cast

import httpx

from providers.base import Provider, ProviderConfig
from providers.errors import ConfigError
from providers.retell import RetellProvider
from providers.synthflow import SynthflowProvider
from providers.vapi import VapiProvider

ENTRY_POINT_GROUP = "callq.providers"
BUILTINS: dict[str, type[Any]] = {
    "vapi": VapiProvider,
    "synthflow": SynthflowProvider,
    "retell": RetellProvider,
}


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_types() -> list[str]:
    """Every provider type that can be built (built-ins and installed plug-ins), sorted."""
    return sorted(set(BUILTINS) | set(_plugins()))


def get_adapter(provider_type: str) -> type[Any]:
    """The adapter class for ``provider_type``; built-ins win over plug-ins of the same name."""
    if provider_type in BUILTINS:
        return BUILTINS[provider_type]
    plugin = _plugins().get(provider_type)
    if plugin is None:
        raise ConfigError(f"unknown provider_type {provider_type!r}")
    try:
        loaded = plugin.load()
    except Exception as exc:
        raise ConfigError(f"provider plug-in {provider_type!r} failed to load") from exc
    if not isinstance(loaded, type):
        raise ConfigError(f"provider plug-in {provider_type!r} is not a class")
    return loaded


def official_base_urls(adapter: type[Any]) -> tuple[str, ...]:
    """The base URLs an adapter declares as its provider's official API (none if undeclared)."""
    declared = getattr(adapter, "official_base_urls", ())
    return tuple(str(url) for url in declared) if isinstance(declared, list | tuple) else ()


def build_provider(config: ProviderConfig, client: httpx.Client | None = None) -> Provider:
    """An adapter instance for ``config`` (optionally over an injected ``httpx.Client``).

    A ``base_url`` outside the adapter's official hosts and the hosts ops allow is refused
    here, with a :class:`ConfigError`, before the adapter exists: no request can follow.
    """
    adapter = get_adapter(config.provider_type)
    config.allowlist.check_base_url(config.id, config.base_url, official_base_urls(adapter))
    return cast(Provider, adapter(config, client))
