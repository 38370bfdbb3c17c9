"""The port: states, config resolution and secrets hygiene."""

from __future__ import annotations

import pytest

from providers.base import CallRequest, CallState, ProviderConfig
from providers.errors import ConfigError, ProviderPermanentError
from providers.registry import build_provider

SECRET = "sk-live-0123456789abcdef"


def row(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "p1",
        "name": "main",
        "provider_type": "vapi",
        "api_key": SECRET,
        "config": {"phone_number_id": "pn"},
    }
    base.update(overrides)
    return base


def test_terminal_states() -> None:
    live = {CallState.QUEUED, CallState.RINGING, CallState.IN_PROGRESS}
    for state in CallState:
        assert state.is_terminal is (state not in live)
    assert CallState("no_answer") is CallState.NO_ANSWER
    assert len(CallState) == 10


def test_from_row_plain_key_is_secret() -> None:
    config = ProviderConfig.from_row(row())
    assert config.api_key.get_secret_value() == SECRET
    for text in (repr(config), str(config), repr(build_provider(config))):
        assert SECRET not in text


def test_from_row_resolves_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLQ_SECRET_TEST_VAPI_KEY", SECRET)
    monkeypatch.setenv("CALLQ_SECRET_TEST_HOOK", "hook-secret")
    config = ProviderConfig.from_row(
        row(api_key="env:CALLQ_SECRET_TEST_VAPI_KEY", webhook_secret="env:CALLQ_SECRET_TEST_HOOK")
    )
    assert config.api_key.get_secret_value() == SECRET
    secret = config.webhook_key()
    assert secret is not None and secret.get_secret_value() == "hook-secret"
    assert "hook-secret" not in repr(config)


def test_from_row_missing_env_names_variable_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLQ_SECRET_TEST_MISSING", raising=False)
    with pytest.raises(ConfigError, match="CALLQ_SECRET_TEST_MISSING"):
        ProviderConfig.from_row(row(api_key="env:CALLQ_SECRET_TEST_MISSING"))


def test_from_row_requires_type_and_key() -> None:
    with pytest.raises(ConfigError):
        ProviderConfig.from_row(row(provider_type=None))
    with pytest.raises(ConfigError):
        ProviderConfig.from_row(row(api_key=""))


def test_from_row_accepts_objects() -> None:
    class Row:
        id = "p2"
        name = "obj"
        provider_type = "synthflow"
        api_key = SECRET
        api_secret = None
        base_url = None
        max_concurrent_calls = 5
        config = {"model_id": "m"}
        capabilities = {"languages": ["en"]}

    config = ProviderConfig.from_row(Row())
    assert config.max_concurrent_calls == 5 and config.setting("model_id") == "m"


def test_call_request_repr_hides_personal_data() -> None:
    req = CallRequest(
        correlation_id="a1",
        to_number="+14155550123",
        recipient_name="Ann Example",
        recipient_email="ann@example.com",
        script="Secret script",
        variables={"dob": "1990-01-01"},
    )
    text = repr(req)
    for private in ("4155550123", "Ann Example", "ann@", "Secret script", "1990"):
        assert private not in text


def test_error_str_has_no_secret() -> None:
    err = ProviderPermanentError("request rejected", provider="vapi", http_status=401, code="x")
    assert str(err) == "request rejected provider=vapi http_status=401 code=x"
