"""Signed ``call.ended`` notifications to the apps' endpoints: signing, the address guard and
one delivery attempt.

Signature header (Stripe style)::

    Callq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

The receiver recomputes the HMAC over the raw body with its endpoint secret, compares it in
constant time and refuses a ``t`` more than five minutes from its clock (:func:`verify`).

The guard resolves the endpoint's host once, refuses the delivery when any address is loopback,
private, link-local, multicast, reserved or otherwise not global (unless ops allow private
networks), and then connects to the address it checked (the request goes to the IP; Host and
TLS SNI keep the name, so the certificate is still verified against it). A DNS answer that
changes between the check and the connection (DNS rebinding) therefore cannot redirect it.
Redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

SIGNATURE_HEADER = "Callq-Signature"
EVENT_ID_HEADER = "Callq-Event-Id"
TOLERANCE_SECONDS = 300


class BlockedAddressError(Exception):
    """The endpoint's host resolves to an address deliveries may not reach."""


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Callq-Signature`` header value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    now: float | None = None,
    tolerance: int = TOLERANCE_SECONDS,
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve_checked(host: str, port: int, *, allow_private: bool) -> str:
    """One address of ``host`` to connect to, after checking every address it resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BlockedAddressError(f"host does not resolve: {exc.strerror}") from exc
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addrs:
        raise BlockedAddressError("host does not resolve")
    if not allow_private and not all(is_public(a) for a in addrs):
        raise BlockedAddressError("host resolves to a private, loopback or link-local address")
    return str(addrs[0])


@dataclass(frozen=True, slots=True)
class Outcome:
    """One delivery attempt: 2xx means delivered."""

    ok: bool
    http_status: int | None
    error: str | None


def deliver(
    client: httpx.Client,
    url: str,
    secret: str,
    event: dict[str, Any],
    *,
    allow_private: bool,
    allow_http: bool,
) -> Outcome:
    """POST the signed event to ``url`` through the guard; never raises for network errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" and not (parts.scheme == "http" and allow_http):
        return Outcome(False, None, "insecure_url")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ip = resolve_checked(host, port, allow_private=allow_private)
    except BlockedAddressError as exc:
        return Outcome(False, None, f"blocked: {exc}")
    netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    target = parts._replace(netloc=netloc).geturl()
    body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "callq-notify/1",
        "Host": parts.netloc.rsplit("@", 1)[-1],
        EVENT_ID_HEADER: str(event.get("id", "")),
        SIGNATURE_HEADER: sign(secret, body),
    }
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    try:
        resp = client.post(target, content=body, headers=headers, extensions=extensions)
    except httpx.TimeoutException:
        return Outcome(False, None, "timeout")
    except httpx.HTTPError as exc:
        return Outcome(False, None, f"http_error: {type(exc).__name__}")
    if 200 <= resp.status_code < 300:
        return Outcome(True, resp.status_code, None)
    return Outcome(False, resp.status_code, f"http_{resp.status_code}")


def new_client(connect_timeout: float, read_timeout: float) -> httpx.Client:
    """The delivery client: short timeouts, no redirects, no environment proxies."""
    timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
    return httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False)
