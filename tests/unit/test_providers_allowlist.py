"""A provider row cannot send the worker's keys elsewhere nor read its environment."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers.allowlist import Allowlist, parse_origin
from providers.base import ProviderConfig
from providers.errors import ConfigError
from providers.registry import build_provider
from providers.synthflow import SynthflowProvider
from providers.vapi import VapiProvider

CLIENT = httpx.Client()  # shared: building a client per example is slow, and none is sent
KEY = "sk-live-canary-0123456789"
DB_SECRET = "postgresql://postgres:hunter2-canary@db.internal/postgres"


def row(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "p1",
        "provider_type": "vapi",
        "api_key": KEY,
        "config": {"phone_number_id": "pn", "model_id": "m"},
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    ("provider_type", "url"),
    [
        ("vapi", "https://api.vapi.ai"),
        ("vapi", "https://API.VAPI.AI/"),
        ("vapi", "https://api.vapi.ai:443/v1"),
        ("synthflow", "https://api.synthflow.ai/v2"),
        ("synthflow", "https://api.us.synthflow.ai/v2"),
        ("synthflow", "https://api.eu.synthflow.ai/v2"),
    ],
)
def test_official_hosts_are_accepted(provider_type: str, url: str) -> None:
    build_provider(ProviderConfig.from_row(row(provider_type=provider_type, base_url=url))).close()


@pytest.mark.parametrize(
    ("provider_type", "url"),
    [
        ("vapi", "https://evil.example"),
        ("vapi", "http://api.vapi.ai"),  # plain http would send the key in clear
        ("vapi", "https://api.vapi.ai:8443"),
        ("vapi", "https://api.vapi.ai.evil.example"),
        ("vapi", "https://api.vapi.ai@evil.example"),
        ("vapi", "https://user:pw@api.vapi.ai"),
        ("vapi", "https://api.synthflow.ai/v2"),  # another type's official host
        ("synthflow", "https://api.vapi.ai"),
        ("synthflow", "https://api.xx.synthflow.ai/v2"),
        ("synthflow", "ftp://api.synthflow.ai/v2"),
        ("vapi", "http://127.0.0.1:8765/vapi"),  # the simulator, not allowed by ops
    ],
)
def test_other_hosts_are_refused_without_a_value_in_the_error(provider_type: str, url: str) -> None:
    config = ProviderConfig.from_row(row(provider_type=provider_type, base_url=url))
    with pytest.raises(ConfigError, match="base_url is not an official host") as info:
        build_provider(config)
    assert url not in str(info.value) and KEY not in str(info.value)


def test_ops_allowed_hosts() -> None:
    allow = Allowlist.from_settings(["http://127.0.0.1:8765", "http://sim:*", "proxy.example"])
    for url in ("http://127.0.0.1:8765/vapi", "http://sim:1/vapi", "https://proxy.example/x"):
        build_provider(ProviderConfig.from_row(row(base_url=url), allow)).close()
    for url in ("http://127.0.0.1:8766/vapi", "https://sim/vapi", "http://proxy.example"):
        with pytest.raises(ConfigError):
            build_provider(ProviderConfig.from_row(row(base_url=url), allow))


def test_allowed_host_entries_must_be_hosts() -> None:
    for bad in ("ftp://x", "http://", "http://a b", "http://user@host"):
        with pytest.raises(ValueError):
            parse_origin(bad)


@given(
    scheme=st.sampled_from(["http", "https", "ftp", "HTTPS"]),
    host=st.sampled_from(["api.vapi.ai", "api.vapi.ai.evil", "evil", "127.0.0.1", "API.vapi.ai"]),
    port=st.sampled_from(["", ":443", ":80", ":8443", ":8765"]),
    userinfo=st.sampled_from(["", "u@", "api.vapi.ai@"]),
    path=st.sampled_from(["", "/", "/v2", "/@evil"]),
)
def test_only_official_or_allowed_origins_build(
    scheme: str, host: str, port: str, userinfo: str, path: str
) -> None:
    url = f"{scheme}://{userinfo}{host}{port}{path}"
    allow = Allowlist.from_settings(["http://127.0.0.1:8765"])
    official = (
        scheme.lower() == "https"
        and host.lower() == "api.vapi.ai"
        and port in ("", ":443")
        and not userinfo
    )
    ops = scheme == "http" and host == "127.0.0.1" and port == ":8765" and not userinfo
    try:
        config = ProviderConfig.from_row(row(base_url=url), allow)
        build_provider(config, CLIENT)
        built = True
    except ConfigError as exc:
        built = False
        assert KEY not in str(exc)
    assert built is (official or ops)


def test_env_references_resolve_only_allowed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", DB_SECRET)
    monkeypatch.setenv("HOME_SECRET", DB_SECRET)
    monkeypatch.setenv("CALLQ_SECRET_VAPI", KEY)
    assert ProviderConfig.from_row(row(api_key="env:CALLQ_SECRET_VAPI")).api_key.get_secret_value()
    for name in ("DATABASE_URL", "HOME_SECRET", "callq_secret_vapi", "CALLQ_SECRETX"):
        with pytest.raises(ConfigError, match="not an allowed secret name") as info:
            ProviderConfig.from_row(row(api_key=f"env:{name}"))
        assert name in str(info.value) and DB_SECRET not in str(info.value)


def test_explicit_names_and_prefixes_but_never_the_workers_own_urls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", DB_SECRET)
    monkeypatch.setenv("VAPI_KEY", KEY)
    allow = Allowlist.from_settings(env_prefixes=["VAPI_", "DATABASE"], env_names=["DATABASE_URL"])
    assert ProviderConfig.from_row(row(api_key="env:VAPI_KEY"), allow).api_key
    with pytest.raises(ConfigError) as info:
        ProviderConfig.from_row(row(api_key="env:DATABASE_URL"), allow)
    assert DB_SECRET not in str(info.value)


@pytest.mark.parametrize("key", ["connect_timeout", "read_timeout", "creates_per_second"])
def test_a_config_value_from_the_environment_never_appears_in_an_error(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("CALLQ_SECRET_TIMEOUT", DB_SECRET)
    monkeypatch.setenv("DATABASE_URL", DB_SECRET)
    for value in ("env:CALLQ_SECRET_TIMEOUT", "env:DATABASE_URL", DB_SECRET):
        with pytest.raises(ConfigError) as info:
            config = ProviderConfig.from_row(
                row(base_url="https://api.vapi.ai", config={"phone_number_id": "p", key: value})
            )
            build_provider(config)
        assert DB_SECRET not in str(info.value)
        assert "hunter2" not in repr(info.value)


def test_invalid_row_fields_are_named_not_shown() -> None:
    with pytest.raises(ConfigError, match="max_concurrent_calls") as info:
        ProviderConfig.from_row(row(max_concurrent_calls=DB_SECRET))
    assert DB_SECRET not in str(info.value)


def test_adapters_declare_their_official_hosts() -> None:
    assert VapiProvider.official_base_urls == ("https://api.vapi.ai",)
    assert len(SynthflowProvider.official_base_urls) == 3
