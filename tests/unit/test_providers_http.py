"""The shared send path: what is retried, what is never re-sent, Retry-After, throttle."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from dispatch.policy import Release, decide_error
from providers._http import Sender, TokenBucket, error_code, max_create_wait, parse_retry_after
from providers.base import CallRequest, ProviderConfig
from providers.errors import (
    ProviderOutcomeUnknownError,
    ProviderPermanentError,
    ProviderRetryableError,
    ProviderThrottledError,
)
from providers.synthflow import SynthflowProvider
from providers.vapi import VapiProvider

KEY = "sk-test-key-should-not-leak"
NUMBER = "+14155550123"
REQ = CallRequest(correlation_id="a-1", to_number=NUMBER, recipient_name="Ann", script="s")


class Recorder:
    """A MockTransport handler that replays scripted responses/exceptions and counts calls."""

    def __init__(
        self, *steps: httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]
    ):
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        if callable(step) and not isinstance(step, httpx.Response):
            return step(request)
        return step


def vapi(rec: Recorder, sleeps: list[float] | None = None) -> VapiProvider:
    config = ProviderConfig(
        id="v",
        provider_type="vapi",
        api_key=KEY,
        config={"phone_number_id": "pn", "assistant_id": "as"},
    )
    provider = VapiProvider(config, httpx.Client(transport=httpx.MockTransport(rec)))
    provider._sender._sleep = sleeps.append if sleeps is not None else lambda _s: None  # type: ignore[assignment]
    return provider


def sender(rec: Recorder, sleeps: list[float]) -> Sender:
    client = httpx.Client(transport=httpx.MockTransport(rec))
    return Sender("vapi", client, headers={"Authorization": f"Bearer {KEY}"}, sleep=sleeps.append)


CREATED = httpx.Response(201, json={"id": "call-1", "status": "queued"})


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.Response(500, json={"message": "Internal server error", "statusCode": 500}),
        httpx.Response(503, text="upstream"),
        httpx.Response(201, text="not json"),
        httpx.Response(201, json={"status": "queued"}),
    ],
    ids=["read-timeout", "protocol", "500", "503", "bad-json", "no-id"],
)
def test_create_is_not_resent_after_outcome_unknown(failure: object) -> None:
    rec = Recorder(failure, CREATED)  # type: ignore[arg-type]
    with pytest.raises(ProviderOutcomeUnknownError):
        vapi(rec).create_call(REQ)
    assert len(rec.requests) == 1


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("refused"), httpx.ConnectTimeout("connect timed out")],
    ids=["connect-error", "connect-timeout"],
)
def test_create_is_retried_after_connect_error(failure: Exception) -> None:
    rec = Recorder(failure, CREATED)
    handle = vapi(rec).create_call(REQ)
    assert handle.provider_call_id == "call-1"
    assert len(rec.requests) == 2


def test_create_retry_is_bounded() -> None:
    rec = Recorder(httpx.ConnectError("refused"))
    with pytest.raises(ProviderRetryableError) as info:
        vapi(rec).create_call(REQ)
    assert len(rec.requests) == 3
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_create_429_honours_short_retry_after() -> None:
    sleeps: list[float] = []
    rec = Recorder(httpx.Response(429, headers={"Retry-After": "2"}, json={}), CREATED)
    vapi(rec, sleeps).create_call(REQ)
    assert len(rec.requests) == 2
    assert sleeps == [2.0]


def test_long_retry_after_goes_back_to_caller() -> None:
    rec = Recorder(httpx.Response(429, headers={"Retry-After": "120"}, json={}), CREATED)
    with pytest.raises(ProviderRetryableError) as info:
        vapi(rec).create_call(REQ)
    assert info.value.retry_after == 120 and info.value.http_status == 429
    assert len(rec.requests) == 1


def test_get_is_retried_on_5xx_and_read_timeout() -> None:
    body = {"id": "call-1", "orgId": "o", "createdAt": "x", "updatedAt": "x", "status": "ringing"}
    rec = Recorder(httpx.Response(502), httpx.ReadTimeout("slow"), httpx.Response(200, json=body))
    status = vapi(rec).get_call("call-1")
    assert status.provider_call_id == "call-1" and len(rec.requests) == 3


def test_get_gives_up_after_three_attempts() -> None:
    rec = Recorder(httpx.Response(500))
    with pytest.raises(ProviderRetryableError):
        vapi(rec).get_call("call-1")
    assert len(rec.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_permanent_and_not_retried(status: int) -> None:
    body = {
        "message": [f"customer.number {NUMBER} must be a valid phone number in the E.164 format."],
        "error": "Bad Request",
        "statusCode": status,
    }
    rec = Recorder(httpx.Response(status, json=body))
    with pytest.raises(ProviderPermanentError) as info:
        vapi(rec).create_call(REQ)
    assert len(rec.requests) == 1
    assert info.value.http_status == status
    text = f"{info.value} {info.value.code} {info.value!r}"
    assert "4155550123" not in text and KEY not in text
    assert "E.164" in (info.value.code or "")


def test_request_carries_bearer_key() -> None:
    rec = Recorder(CREATED)
    vapi(rec).create_call(REQ)
    assert rec.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert str(rec.requests[0].url) == "https://api.vapi.ai/call"


def test_timeouts_come_from_config() -> None:
    rec = Recorder(CREATED)
    config = ProviderConfig(
        id="v", provider_type="vapi", api_key=KEY,
        config={"phone_number_id": "pn", "connect_timeout": 1.5, "read_timeout": 7},
    )  # fmt: skip
    VapiProvider(config, httpx.Client(transport=httpx.MockTransport(rec))).create_call(REQ)
    timeout = rec.requests[0].extensions["timeout"]
    assert timeout["connect"] == 1.5 and timeout["read"] == 7


def test_error_code_shapes() -> None:
    assert (
        error_code(
            httpx.Response(
                404,
                json={
                    "detail": {
                        "status": "error",
                        "description": "nope",
                        "request_id": "r",
                        "category": "not_found",
                    }
                },
            )
        )
        == "not_found"
    )
    assert (
        error_code(httpx.Response(400, json={"detail": "Invalid model_id"})) == "Invalid model_id"
    )
    assert (
        error_code(httpx.Response(401, json={"error": "unauthorized", "message": "bad key"}))
        == "bad key"
    )
    assert (
        error_code(
            httpx.Response(
                422, json={"detail": [{"loc": ["body", "phone"], "type": "value_error.missing"}]}
            )
        )
        == "value_error.missing body.phone"
    )
    assert error_code(httpx.Response(500, text="<html>")) == "http_500"


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert (
        parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30
    )
    assert parse_retry_after("garbage") is None and parse_retry_after(None) is None


def test_token_bucket_paces_creates() -> None:
    clock = [0.0]
    sleeps: list[float] = []
    bucket = TokenBucket(2.0, clock=lambda: clock[0], sleep=sleeps.append)
    waits = [bucket.acquire() for _ in range(4)]
    assert waits == [0.0, 0.5, 1.0, 1.5]
    assert sleeps == [0.5, 1.0, 1.5]


def test_synthflow_throttles_creates_to_one_per_second() -> None:
    sleeps: list[float] = []
    ok = httpx.Response(
        200, json={"status": "success", "response": {"answer": "ok", "call_id": "c"}}
    )
    rec = Recorder(ok)
    config = ProviderConfig(
        id="s", provider_type="synthflow", api_key=KEY, config={"model_id": "m"}
    )
    provider = SynthflowProvider(config, httpx.Client(transport=httpx.MockTransport(rec)))
    assert provider._sender._throttle is not None
    provider._sender._throttle._sleep = sleeps.append
    for _ in range(3):
        provider.create_call(REQ)
    # the fake sleep does not advance the clock, so the reserved slots pile up: ~1 s, ~2 s
    assert [round(s) for s in sleeps] == [1, 2]


def test_sender_health_single_attempt() -> None:
    rec = Recorder(httpx.Response(503))
    health = vapi(rec).check_health()
    assert not health.ok and len(rec.requests) == 1 and "503" in (health.detail or "")
    assert KEY not in (health.detail or "")


def test_sender_raw_retry_flag() -> None:
    sleeps: list[float] = []
    rec = Recorder(httpx.ConnectError("x"), httpx.Response(200, json={}))
    response = sender(rec, sleeps).request("GET", "https://h/x")
    assert response.status_code == 200 and len(sleeps) == 1 and sleeps[0] <= 2.0


def test_vapi_find_call_pages_by_created_at() -> None:
    def call(i: int, corr: str) -> dict[str, object]:
        return {"id": f"c{i}", "orgId": "o",
                "createdAt": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}.000Z",
                "updatedAt": "x", "status": "queued", "customer": {"externalId": corr}}  # fmt: skip

    first = [call(i, "other") for i in range(199, 99, -1)]
    second = [call(100, "other"), call(5, "a-1")]  # the boundary's millisecond is read again
    rec = Recorder(httpx.Response(200, json=first), httpx.Response(200, json=second))
    found = vapi(rec).find_call(REQ, datetime(2026, 1, 1, tzinfo=UTC))
    assert found is not None and found.provider_call_id == "c5"
    assert rec.requests[0].url.params["createdAtGt"] == "2026-01-01T00:00:00.000Z"
    assert rec.requests[1].url.params["createdAtLt"] == "2026-01-01T00:01:40.001Z"


def test_token_bucket_refuses_a_wait_past_the_bound_without_taking_a_token() -> None:
    clock = [0.0]
    bucket = TokenBucket(1.0, clock=lambda: clock[0], sleep=lambda _: None)
    assert [bucket.acquire(max_wait=1.5) for _ in range(2)] == [0.0, 1.0]
    assert bucket.acquire(max_wait=1.5) is None  # would wait 2 s
    assert bucket.wait_needed() == 2.0  # nothing was taken by the refusal
    clock[0] = 1.0
    assert bucket.acquire(max_wait=1.5) == 1.0


def test_a_create_never_waits_in_the_throttle_past_the_dialing_lease() -> None:
    ok = httpx.Response(
        200, json={"status": "success", "response": {"answer": "ok", "call_id": "c"}}
    )
    rec = Recorder(ok)
    config = ProviderConfig(
        id="s", provider_type="synthflow", api_key=KEY, dial_lease_seconds=10.0,
        config={"model_id": "m", "creates_per_second": 0.5, "connect_timeout": 1,
                "read_timeout": 4},
    )  # fmt: skip
    assert max_create_wait(10.0, 1.0, 4.0) == 5.0 and max_create_wait(3.0, 1.0, 4.0) == 0.0
    provider = SynthflowProvider(config, httpx.Client(transport=httpx.MockTransport(rec)))
    assert provider._sender._throttle is not None
    provider._sender._throttle._sleep = lambda _: None
    provider.create_call(REQ)  # no wait
    provider.create_call(REQ)  # 2 s
    provider.create_call(REQ)  # 4 s
    with pytest.raises(ProviderThrottledError) as info:
        provider.create_call(REQ)  # 6 s > 10 - 1 - 4: refused, nothing sent
    assert len(rec.requests) == 3 and info.value.retry_after == pytest.approx(6.0, abs=0.5)
    assert decide_error(info.value) == Release("client_throttle", info.value.retry_after)
