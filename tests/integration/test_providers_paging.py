"""Vapi ``find_call`` pages through more than one page of calls, ties included.

``GET /call`` has no cursor: the adapter pages back with ``createdAtLt``. Calls created in the
same millisecond straddle page boundaries (the simulator's ``clock_resolution_ms`` makes them
at will), which a naive ``createdAtLt = oldest`` walk skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

import providers.vapi
from providers.base import CallRequest, ProviderConfig
from providers.errors import ProviderRetryableError
from providers.simulator import Simulator
from providers.vapi import VapiProvider
from tests.conftest import running_simulator

KEY = "sim-vapi-key"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with running_simulator({"outcome_mix": {"completed": 1}, "call_seconds": 60}) as s:
        yield s


class Counting(httpx.Client):
    """Counts the list requests the adapter sends."""

    lists = 0

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        if request.method == "GET" and request.url.path.endswith("/call"):
            self.lists += 1
        return super().send(request, **kwargs)


def provider(sim: Simulator) -> tuple[VapiProvider, Counting]:
    client = Counting()
    config = ProviderConfig(
        id="v", provider_type="vapi", api_key=KEY, base_url=sim.vapi_url,
        config={"phone_number_id": "pn-1", "assistant_id": "as-1"},
    )  # fmt: skip
    return VapiProvider(config, client), client


def request(tag: str, n: int) -> CallRequest:
    return CallRequest(correlation_id=f"{tag}-{n}", to_number=f"+1415555{n:04d}")


def create_many(sim: Simulator, vapi: VapiProvider, tag: str, count: int) -> list[CallRequest]:
    sim.reset()
    made = [request(tag, n) for n in range(count)]
    for req in made:
        vapi.create_call(req)
    return made


@pytest.mark.parametrize("resolution_ms", [10_000, 7])
def test_every_call_is_found_across_pages_with_equal_timestamps(
    sim: Simulator, resolution_ms: int
) -> None:
    """10 s: all 250 calls share one ``createdAt``; 7 ms: clumps straddle the page edges."""
    sim.configure({"clock_resolution_ms": resolution_ms})
    vapi, client = provider(sim)
    try:
        since = datetime.now(UTC) - timedelta(seconds=30)
        made = create_many(sim, vapi, f"tie{resolution_ms}", 250)
        stamps = {c["createdAt"] for c in httpx.get(
            f"{sim.vapi_url}/call", params={"limit": 1000},
            headers={"Authorization": f"Bearer {KEY}"}).json()}  # fmt: skip
        assert len(stamps) < 250  # ties exist
        for req in [made[0], made[1], made[99], made[100], made[101], made[150], made[-1]]:
            found = vapi.find_call(req, since)
            assert found is not None and found.correlation_id == req.correlation_id
        client.lists = 0
        assert vapi.find_call(request("absent", 1), since) is None
        assert client.lists <= 6  # a bounded walk, not a loop
    finally:
        sim.configure({"clock_resolution_ms": 1})
        vapi.close()


def test_a_window_larger_than_we_read_is_retryable_not_absent(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never answer "not found" without reading the whole window: the caller would re-dial."""
    vapi, _ = provider(sim)
    try:
        since = datetime.now(UTC) - timedelta(seconds=30)
        made = create_many(sim, vapi, "window", 120)
        monkeypatch.setattr(providers.vapi, "_MAX_PAGES", 1)
        with pytest.raises(ProviderRetryableError):
            vapi.find_call(request("absent", 2), since)
        found = vapi.find_call(made[-1], since)  # the newest is on the first page
        assert found is not None
    finally:
        vapi.close()
