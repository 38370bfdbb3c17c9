"""Notifications: the signature (sign, verify, tolerance), the address guard, and that the
request goes to the address that was checked (DNS rebinding), with Host and SNI kept."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

import httpx
import pytest

from worker import notify

SECRET = "whsec_test"


def test_signature_round_trip_and_refusals() -> None:
    body = b'{"id":"n1","type":"call.ended"}'
    header = notify.sign(SECRET, body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert notify.verify(SECRET, body, header, now=1_700_000_100)
    assert not notify.verify(SECRET, body + b" ", header, now=1_700_000_100)  # body changed
    assert not notify.verify("whsec_other", body, header, now=1_700_000_100)  # other secret
    assert not notify.verify(SECRET, body, header, now=1_700_000_301)  # too old: a replay
    assert not notify.verify(SECRET, body, "v1=" + header.split("v1=")[1], now=1_700_000_000)
    # what a receiver in any language computes: HMAC-SHA256 over "<t>.<body>", hex
    import hashlib
    import hmac

    mac = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={mac}"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:8.8.8.8", True),
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert notify.is_public(ipaddress.ip_address(address)) is public


def _resolver(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> None:
    def fake(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers]

    monkeypatch.setattr(notify.socket, "getaddrinfo", fake)


def _client(seen: list[httpx.Request], status: int = 200) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status)

    return httpx.Client(transport=httpx.MockTransport(handler))


EVENT = {"id": "n1", "type": "call.ended", "data": {"queue_id": "q1"}}


def test_delivery_connects_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    _resolver(monkeypatch, ["93.184.216.34"])
    seen: list[httpx.Request] = []
    out = notify.deliver(
        _client(seen), "https://hooks.example.com/in?x=1", SECRET, EVENT,
        allow_private=False, allow_http=False,
    )  # fmt: skip
    assert out == notify.Outcome(True, 200, None)
    (req,) = seen
    assert req.url.host == "93.184.216.34" and req.url.path == "/in" and req.url.query == b"x=1"
    assert req.headers["host"] == "hooks.example.com"
    assert req.extensions["sni_hostname"] == "hooks.example.com"
    assert req.headers[notify.EVENT_ID_HEADER] == "n1"
    assert notify.verify(SECRET, req.content, req.headers[notify.SIGNATURE_HEADER])
    assert json.loads(req.content) == EVENT


@pytest.mark.parametrize(
    "answers",
    [["127.0.0.1"], ["93.184.216.34", "10.0.0.5"], ["169.254.169.254"], ["::1"]],
)
def test_a_private_address_anywhere_in_the_answer_blocks(
    monkeypatch: pytest.MonkeyPatch, answers: list[str]
) -> None:
    _resolver(monkeypatch, answers)
    seen: list[httpx.Request] = []
    out = notify.deliver(
        _client(seen), "https://rebind.example.com/", SECRET, EVENT,
        allow_private=False, allow_http=False,
    )  # fmt: skip
    assert not out.ok and out.error is not None and out.error.startswith("blocked:")
    assert seen == []


def test_ops_may_allow_private_and_http_for_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []
    url = "http://127.0.0.1:9/hook"
    refused = notify.deliver(
        _client(seen), url, SECRET, EVENT, allow_private=False, allow_http=False
    )
    assert refused.error == "insecure_url" and seen == []
    ok = notify.deliver(_client(seen), url, SECRET, EVENT, allow_private=True, allow_http=True)
    assert ok.ok and seen[0].url.host == "127.0.0.1"


def test_non_2xx_and_timeouts_are_failures_with_a_short_reason() -> None:
    seen: list[httpx.Request] = []
    url = "http://127.0.0.1:9/hook"
    out = notify.deliver(
        _client(seen, 503), url, SECRET, EVENT, allow_private=True, allow_http=True
    )
    assert out == notify.Outcome(False, 503, "http_503")

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    client = httpx.Client(transport=httpx.MockTransport(slow))
    out = notify.deliver(client, url, SECRET, EVENT, allow_private=True, allow_http=True)
    assert out == notify.Outcome(False, None, "timeout")
