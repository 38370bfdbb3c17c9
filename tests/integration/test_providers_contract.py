"""One contract, every registered provider, over the simulator (HTTP) and over MockTransport.

Adding a provider: give it a simulator and a ``SETUPS`` entry; this test names what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from providers.allowlist import Allowlist
from providers.base import CallRequest, CallState, CallStatus, Provider, ProviderConfig
from providers.errors import (
    ProviderOutcomeUnknownError,
    ProviderPermanentError,
    ProviderRetryableError,
    ProviderUnprovenMatchError,
    WebhookAuthError,
    WebhookPayloadError,
)
from providers.registry import available_types, build_provider
from providers.retell import sign as retell_sign
from providers.simulator import Simulator
from tests.conftest import running_simulator
from tests.integration.receiver import Receiver

HOOK_SECRET = "sim-webhook-secret"
SIGNATURE_HEADERS = ("x-signature", "synthflow-signature", "x-vapi-secret", "x-retell-signature")
FAST = {
    "queue_seconds": 0.02, "ring_seconds": 0.05, "call_seconds": 0.1,
    "outcome_mix": {"completed": 1},
    "outcomes_by_suffix": {
        "0002": "busy", "0003": "no_answer", "0004": "voicemail", "0005": "failed",
        "0006": "failed_permanent", "0007": "failed_after_answer", "0009": "stuck",
    },
}  # fmt: skip
EXPECTED = {
    "0001": CallState.COMPLETED, "0002": CallState.BUSY, "0003": CallState.NO_ANSWER,
    "0004": CallState.VOICEMAIL, "0005": CallState.FAILED_RETRYABLE,
    "0006": CallState.FAILED_PERMANENT, "0007": CallState.FAILED_RETRYABLE,
}  # fmt: skip


@dataclass(frozen=True)
class Setup:
    key: str
    path: str
    config: dict[str, Any]
    cancellable: bool
    webhooks_per_call: int  # deliveries for a completed call
    webhook_secret: str = HOOK_SECRET


SETUPS = {
    "vapi": Setup(
        "sim-vapi-key", "/vapi", {"phone_number_id": "pn-1", "assistant_id": "as-1"}, True, 2
    ),
    "synthflow": Setup(
        "sim-synthflow-key",
        "/synthflow/v2",
        {"model_id": "m-1", "creates_per_second": 200},
        False,
        1,
    ),
    # Retell signs webhooks with the account's API key
    "retell": Setup(
        "sim-retell-key",
        "/retell",
        {"from_number": "+14155550100", "agent_id": "agent_1"},
        True,
        3,
        "sim-retell-key",
    ),
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def sim(receiver: Receiver) -> Iterator[Simulator]:
    with running_simulator({**FAST, "webhook_url": receiver.url}) as s:
        yield s


def mock_client(sim: Simulator) -> httpx.Client:
    """An httpx client whose transport calls the simulator's handler in-process."""

    def handler(request: httpx.Request) -> httpx.Response:
        status, body, headers = sim.handle(
            request.method, request.url.path, request.url.query.decode(), request.headers,
            request.content,
        )  # fmt: skip
        if body is None:  # 204
            return httpx.Response(status, headers=headers or {})
        return httpx.Response(status, json=body, headers=headers or {})

    return httpx.Client(transport=httpx.MockTransport(handler))


# The simulator is not an official host: allowed as ops allow it (CALLQ_PROVIDER_ALLOWED_HOSTS).
SIM_HOSTS = Allowlist.from_settings(["http://127.0.0.1:*", "http://sim.test"])


@pytest.fixture(params=sorted(SETUPS))
def provider_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["http", "mock"])
def make(
    request: pytest.FixtureRequest, sim: Simulator, provider_type: str
) -> Iterator[Callable[..., Provider]]:
    built: list[Provider] = []

    def factory(key: str | None = None, **config: Any) -> Provider:
        setup = SETUPS[provider_type]
        base = sim.base_url if request.param == "http" else "http://sim.test"
        row = {
            "id": f"{provider_type}-1", "name": provider_type, "provider_type": provider_type,
            "api_key": key or setup.key, "base_url": base + setup.path,
            "webhook_secret": setup.webhook_secret, "config": {**setup.config, **config},
        }  # fmt: skip
        client = mock_client(sim) if request.param == "mock" else None
        provider = build_provider(ProviderConfig.from_row(row, SIM_HOSTS), client)
        built.append(provider)
        return provider

    yield factory
    for p in built:
        p.close()


def test_every_registered_provider_has_a_contract_setup() -> None:
    assert set(available_types()) >= {"vapi", "synthflow", "retell"}
    missing = set(available_types()) - set(SETUPS) - {"callq_test_echo"}
    assert not missing, f"add a simulator setup for {missing}"


_counter = iter(range(10**9))


def req(suffix: str = "0001") -> CallRequest:
    n = next(_counter)
    return CallRequest(
        correlation_id=f"corr-{time.time_ns()}-{n}", queue_id=f"q-{n}",
        to_number=f"+141{n % 100000:05d}{suffix}", recipient_name="Ann",
        recipient_email="ann@example.com",
        script="You are friendly.", first_message="Hi {{ recipient_name }}",
        variables={"recipient_name": "Ann"}, template_name="Reminder",
    )  # fmt: skip


def wait_terminal(provider: Provider, call_id: str, timeout: float = 5.0) -> CallStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = provider.get_call(call_id)
        if status.state.is_terminal or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


@pytest.mark.parametrize("suffix", sorted(EXPECTED))
def test_create_then_poll_to_outcome(make: Callable[..., Provider], suffix: str) -> None:
    provider = make()
    handle = provider.create_call(req(suffix))
    assert handle.provider_call_id and not handle.state.is_terminal
    status = wait_terminal(provider, handle.provider_call_id)
    assert status.state is EXPECTED[suffix]
    assert status.provider_call_id == handle.provider_call_id
    assert status.answered is (suffix in ("0001", "0007"))
    if status.state is CallState.COMPLETED:
        assert status.duration_seconds is not None and status.started_at and status.ended_at


def test_find_call(make: Callable[..., Provider], sim: Simulator) -> None:
    provider = make()
    since = datetime.now(UTC) - timedelta(seconds=1)
    r = req()
    handle = provider.create_call(r)
    found = provider.find_call(r, since)
    assert found is not None and found.provider_call_id == handle.provider_call_id
    assert provider.find_call(req(), since) is None


def test_a_call_without_proof_is_never_adopted(
    make: Callable[..., Provider], sim: Simulator, provider_type: str
) -> None:
    if provider_type != "synthflow":
        pytest.skip("only SynthFlow may not echo the correlation id")
    sim.configure({"synthflow_echo_variables": False})
    try:
        provider = make()
        since = datetime.now(UTC) - timedelta(seconds=1)
        theirs = req("0881")
        ours = dataclasses.replace(req("0881"), to_number=theirs.to_number)  # one number
        provider.create_call(theirs)
        with pytest.raises(ProviderUnprovenMatchError):
            provider.find_call(ours, since)
    finally:
        sim.configure({"synthflow_echo_variables": True})


def test_health(make: Callable[..., Provider]) -> None:
    assert make().check_health().ok
    bad = make(key="wrong-key").check_health()
    assert not bad.ok and "401" in (bad.detail or "") and "wrong-key" not in (bad.detail or "")


def test_bad_key_is_permanent(make: Callable[..., Provider]) -> None:
    with pytest.raises(ProviderPermanentError) as info:
        make(key="wrong-key").create_call(req())
    assert info.value.http_status == 401
    assert "wrong-key" not in str(info.value)


def test_cancel(make: Callable[..., Provider], provider_type: str) -> None:
    provider = make()
    handle = provider.create_call(req("0009"))  # never ends by itself
    assert provider.cancel_call(handle.provider_call_id) is SETUPS[provider_type].cancellable
    if SETUPS[provider_type].cancellable:
        assert provider.get_call(handle.provider_call_id).state is CallState.CANCELED


def test_concurrency_cap_is_retryable_with_retry_after(
    make: Callable[..., Provider], sim: Simulator
) -> None:
    sim.configure({"max_concurrent": 0, "retry_after_seconds": 30})
    try:
        with pytest.raises(ProviderRetryableError) as info:
            make().create_call(req())
        assert info.value.http_status == 429 and info.value.retry_after == 30
    finally:
        sim.configure({"max_concurrent": None})


def test_outcome_unknown_then_reconcile_without_resend(
    make: Callable[..., Provider], sim: Simulator
) -> None:
    provider = make(read_timeout=0.3)
    r = req()
    since = datetime.now(UTC) - timedelta(seconds=1)
    sim.configure({"outages": [{"start": 0, "end": 60, "mode": "timeout"}], "timeout_seconds": 0.6})
    try:
        with pytest.raises(ProviderOutcomeUnknownError):
            provider.create_call(r)
    finally:
        sim.configure({"outages": []})
    assert sim.stats()["creates"][r.correlation_id] == 1
    found = provider.find_call(r, since)
    assert found is not None
    assert sim.stats()["creates"][r.correlation_id] == 1


def test_500_on_create_is_outcome_unknown_and_not_resent(
    make: Callable[..., Provider], sim: Simulator
) -> None:
    provider = make()
    r = req()
    before = sim.stats()["counters"].get("outage_500", 0)
    sim.configure({"outages": [{"start": 0, "end": 60, "mode": "500"}]})
    try:
        with pytest.raises(ProviderOutcomeUnknownError):
            provider.create_call(r)
        assert sim.stats()["counters"]["outage_500"] == before + 1  # sent once
    finally:
        sim.configure({"outages": []})
    assert r.correlation_id not in sim.stats()["creates"]


def test_webhooks(make: Callable[..., Provider], receiver: Receiver, provider_type: str) -> None:
    provider = make()
    handle = provider.create_call(req())
    setup = SETUPS[provider_type]
    mine = receiver.wait_for(handle.provider_call_id.encode(), setup.webhooks_per_call)
    assert len(mine) == setup.webhooks_per_call, "webhooks missing"
    headers, body = mine[-1]
    event = provider.parse_webhook(headers, body)
    assert event.provider_call_id == handle.provider_call_id
    assert event.status.state is CallState.COMPLETED
    with pytest.raises(WebhookAuthError):
        provider.parse_webhook({"Content-Type": "application/json"}, body)
    tampered = dict(headers)
    for name in list(tampered):
        if name.lower() in SIGNATURE_HEADERS:
            tampered[name] = "AAAA" + tampered[name][4:]
    with pytest.raises(WebhookAuthError):
        provider.parse_webhook(tampered, body)
    # an HMAC over the body fails on any other body: sign the malformed one properly
    bad = b"{not json"
    valid = {
        "vapi": {"X-Vapi-Secret": HOOK_SECRET},
        "retell": {"x-retell-signature": retell_sign(bad, setup.key, int(time.time() * 1000))},
    }.get(provider_type, headers)
    with pytest.raises(WebhookPayloadError):
        provider.parse_webhook(valid, bad)


def test_webhook_event_matches_poll(make: Callable[..., Provider]) -> None:
    provider = make()
    handle = provider.create_call(req("0002"))
    status = wait_terminal(provider, handle.provider_call_id)
    assert status.state is CallState.BUSY
    assert json.loads(json.dumps(status.state)) == "busy"
