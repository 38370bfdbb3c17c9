"""``callq webhooks``: a real server (uvicorn, our ASGI app) in its own process, real database and
Redis broker, probed over raw sockets.

Authenticated per provider, 4xx for bad requests, work enqueued by id; bounded in time, size and
connections; never a 5xx, a hang or an acceptance without a valid signature (hypothesis).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.retell import sign as retell_sign
from tests.conftest import broker_messages
from worker.embedded import free_port, wait_for_port, wait_until
from worker.seed import SIM_RETELL_KEY, Seeded, seed_demo

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec-test-secret"
HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_BODY = 64 * 1024
MAX_HEAD = 8 * 1024
# Every answer must come within the two deadlines plus scheduling slack on a loaded machine.
ANSWER_WITHIN = HEAD_TIMEOUT + BODY_TIMEOUT + 4.0


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    url = redis_url.rsplit("/", 1)[0] + "/8"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def seeded(db_url: str) -> Seeded:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return seed_demo(
            conn, sim_base_url="http://127.0.0.1:9", webhook_secret=SECRET,
            providers=("vapi", "synthflow", "retell"),
        )  # fmt: skip


@pytest.fixture
def server(db_url: str, broker: redis.Redis, seeded: Seeded, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    kw = broker.connection_pool.connection_kwargs
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": db_url,
        "CALLQ_BROKER_URL": f"redis://{kw['host']}:{kw['port']}/8",
        "CALLQ_PROVIDER_ALLOWED_HOSTS": "http://127.0.0.1:9",
        "CALLQ_WEBHOOK_HEADER_TIMEOUT_SECONDS": str(HEAD_TIMEOUT),
        "CALLQ_WEBHOOK_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
        "CALLQ_WEBHOOK_MAX_BODY_BYTES": str(MAX_BODY),
        "CALLQ_WEBHOOK_MAX_HEADER_BYTES": str(MAX_HEAD),
        "CALLQ_WEBHOOK_SECRET_TTL_SECONDS": "0.5",
        "CALLQ_WEBHOOK_MAX_CONNECTIONS": "200",
        "CALLQ_LOG_LEVEL": "INFO",
    }
    log = tmp_path / "webhooks.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "webhooks", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    srv = Server(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        wait_for_port(port, 30)
        deadline = time.monotonic() + 30
        while httpx.get(f"{srv.url}/healthz").status_code != 200:
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.1)
        yield srv
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "Traceback" not in srv.output(), srv.output()[-3000:]


# -- raw HTTP -------------------------------------------------------------------------------------


def exchange(port: int, raw: bytes, timeout: float = ANSWER_WITHIN) -> tuple[int | None, float]:
    """Send ``raw`` on a new connection; (status of the first answer or None if closed, seconds)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, time.monotonic() - start


def request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def vapi_body(call_id: str = "call-123") -> bytes:
    message = {
        "type": "status-update",
        "status": "ended",
        "endedReason": "customer-ended-call",
        "call": {
            "id": call_id,
            "orgId": "org-1",
            "createdAt": "2026-11-24T10:00:00.000Z",
            "updatedAt": "2026-11-24T10:01:00.000Z",
            "status": "ended",
            "endedReason": "customer-ended-call",
            "customer": {"number": "+15550001111"},
        },
    }
    return json.dumps({"message": message}).encode()


def synthflow_body(call_id: str) -> bytes:
    call = {"call_id": call_id, "status": "completed", "end_call_reason": "human_goodbye"}
    return json.dumps({"status": "completed", "call": call}).encode()


def vapi_hmac(body: bytes, timestamp: str, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def synthflow_signature(call_id: str, secret: str = SECRET) -> str:
    digest = hmac.new(secret.encode(), call_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def queued_task_args(broker: redis.Redis, queue: str = "track", wait_for: int = 0) -> list[Any]:
    """The tasks in ``queue``; waits (bounded) until there are ``wait_for`` of them: an accepted
    delivery is answered first and enqueued right after."""
    with contextlib.suppress(TimeoutError):  # fewer are reported, and the test says which
        wait_until(lambda: len(broker_messages(broker, queue)) >= wait_for, timeout=10)
    return broker_messages(broker, queue)


# -- behaviour ------------------------------------------------------------------------------------


def test_authentication_and_answers(server: Server, seeded: Seeded, broker: redis.Redis) -> None:
    vapi = f"{server.url}/webhooks/{seeded.provider_ids['vapi']}"
    assert httpx.post(vapi, content=vapi_body()).status_code == 401
    assert httpx.post(vapi, content=vapi_body(), headers={"X-Vapi-Secret": "no"}).status_code == 401
    ok = {"X-Vapi-Secret": SECRET}
    assert httpx.post(vapi, content=b"{not json", headers=ok).status_code == 400
    unknown = f"{server.url}/webhooks/00000000-0000-0000-0000-000000000000"
    assert httpx.post(unknown, content=vapi_body()).status_code == 404
    assert httpx.post(f"{server.url}/webhooks/not-a-uuid", content=b"{}").status_code == 404
    assert httpx.get(vapi).status_code == 405
    assert broker_messages(broker, "track") == []


def test_a_hint_enqueues_ids_only_and_a_status_update_nothing(
    server: Server, seeded: Seeded, broker: redis.Redis
) -> None:
    vapi = str(seeded.provider_ids["vapi"])
    response = httpx.post(
        f"{server.url}/webhooks/{vapi}",
        content=vapi_body("call-abc"),
        headers={"X-Vapi-Secret": SECRET},
    )
    assert response.status_code == 200  # the end-of-call-report ends the call: nothing to do
    synthflow = str(seeded.provider_ids["synthflow"])
    headers = {"Synthflow-Signature": synthflow_signature("sf-ids")}
    body = synthflow_body("sf-ids")
    for _ in range(2):  # the same delivery again (SynthFlow signs no timestamp): a replay
        response = httpx.post(f"{server.url}/webhooks/{synthflow}", content=body, headers=headers)
        assert response.status_code == 200
    tasks = queued_task_args(broker, wait_for=1)
    assert [(name, args) for name, args, _ in tasks] == [
        ("callq.webhook", [[[synthflow, "sf-ids"]]])
    ]
    assert b"+1555" not in tasks[0][2] and b"human_goodbye" not in tasks[0][2]


def test_vapi_hmac_requires_a_fresh_timestamp(server: Server, seeded: Seeded) -> None:
    path = f"/webhooks/{seeded.provider_ids['vapi']}"
    body = vapi_body("call-hmac")
    now = str(int(time.time() * 1000))
    no_ts = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    stale = str(int(time.time()) - 3600)
    cases = [
        ({"x-signature": no_ts}, 401),  # the old main accepted a signature without timestamp
        ({"x-signature": vapi_hmac(body, stale), "x-timestamp": stale}, 401),
        ({"x-signature": vapi_hmac(body, now), "x-timestamp": "abc"}, 401),
        ({"x-signature": vapi_hmac(body + b" ", now), "x-timestamp": now}, 401),
        ({"x-signature": vapi_hmac(body, now), "x-timestamp": now}, 200),
    ]
    for headers, expected in cases:
        assert exchange(server.port, request(path, body, headers))[0] == expected, headers


def test_synthflow_signature_is_checked(
    server: Server, seeded: Seeded, broker: redis.Redis
) -> None:
    provider_id = str(seeded.provider_ids["synthflow"])
    url = f"{server.url}/webhooks/{provider_id}"
    body = synthflow_body("sf-1")
    assert httpx.post(url, content=body, headers={"Synthflow-Signature": "nope"}).status_code == 401
    ok = httpx.post(url, content=body, headers={"Synthflow-Signature": synthflow_signature("sf-1")})
    assert ok.status_code == 200
    [(_, (items,), _)] = queued_task_args(broker, wait_for=1)
    assert items == [[provider_id, "sf-1"]]


def test_a_burst_of_hints_goes_out_batched_each_id_once(
    server: Server, seeded: Seeded, broker: redis.Redis
) -> None:
    provider_id = str(seeded.provider_ids["synthflow"])
    url = f"{server.url}/webhooks/{provider_id}"
    ids = [f"sf-burst-{i}" for i in range(20)]
    with httpx.Client() as client:  # one keep-alive connection, as a provider sends
        for call_id in ids:
            headers = {"Synthflow-Signature": synthflow_signature(call_id)}
            body = synthflow_body(call_id)
            assert client.post(url, content=body, headers=headers).status_code == 200

    def sent() -> list[list[str]]:
        return [item for _, (items,), _ in queued_task_args(broker) for item in items]

    wait_until(lambda: len(sent()) >= len(ids), timeout=10, interval=0.05, what="the burst sent")
    assert sorted(sent()) == sorted([provider_id, call_id] for call_id in ids)


def retell_body(event: str, call_id: str = "call_r1") -> bytes:
    call = {
        "call_id": call_id, "call_type": "phone_call", "agent_id": "agent_1", "agent_version": 1,
        "call_status": "ended", "direction": "outbound", "from_number": "+15550000000",
        "to_number": "+15550001111", "disconnection_reason": "user_hangup",
        "start_timestamp": 1_764_000_000_000, "end_timestamp": 1_764_000_030_000,
    }  # fmt: skip
    return json.dumps({"event": event, "call": call}, separators=(",", ":")).encode()


def test_retell_signature_is_checked(server: Server, seeded: Seeded, broker: redis.Redis) -> None:
    """x-retell-signature = v=<ms>,d=<hex HMAC-SHA256(API key, body + ms)>, five minutes."""
    path = f"/webhooks/{seeded.provider_ids['retell']}"
    body = retell_body("call_ended")
    now = int(time.time() * 1000)
    cases = [
        ({}, 401),
        ({"x-retell-signature": retell_sign(body, "other-key", now)}, 401),
        ({"x-retell-signature": retell_sign(body, SIM_RETELL_KEY, now - 3_600_000)}, 401),
        ({"x-retell-signature": retell_sign(body + b" ", SIM_RETELL_KEY, now)}, 401),
        ({"x-retell-signature": retell_sign(body, SIM_RETELL_KEY, now)}, 200),
    ]
    for headers, expected in cases:
        assert exchange(server.port, request(path, body, headers))[0] == expected, headers
    started = retell_body("call_started", "call_r2")
    signed = {"x-retell-signature": retell_sign(started, SIM_RETELL_KEY, now)}
    assert exchange(server.port, request(path, started, signed))[0] == 200
    bad = b"{not json"
    signed = {"x-retell-signature": retell_sign(bad, SIM_RETELL_KEY, now)}
    assert exchange(server.port, request(path, bad, signed))[0] == 400
    # call_ended is final, call_started changes nothing
    assert broker_messages(broker, "track") == []


def test_the_secret_comes_from_its_column_and_is_reloaded(
    server: Server, seeded: Seeded, db_url: str
) -> None:
    provider_id = seeded.provider_ids["synthflow"]
    url = f"{server.url}/webhooks/{provider_id}"
    body = synthflow_body("sf-2")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE call_service_providers SET webhook_secret = 'rotated' WHERE id = %s",
            (provider_id,),
        )
    headers = {"Synthflow-Signature": synthflow_signature("sf-2", "rotated")}
    deadline = time.monotonic() + 10
    while httpx.post(url, content=body, headers=headers).status_code != 200:
        assert time.monotonic() < deadline, "the rotated secret was never picked up"
        time.sleep(0.2)
    old = {"Synthflow-Signature": synthflow_signature("sf-2")}
    assert httpx.post(url, content=body, headers=old).status_code == 401


def test_body_limits_hold_whatever_the_framing(server: Server, seeded: Seeded) -> None:
    path = f"/webhooks/{seeded.provider_ids['vapi']}"
    big = b"x" * (MAX_BODY + 1)
    # Content-Length: -1 read 60 MB before the 401 on the old main
    minus = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n".encode()
    assert exchange(server.port, minus + b"x" * 4_000_000)[0] == 400
    # a declared length over the limit is refused before the body is read
    declared = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {10**9}\r\n\r\n".encode()
    status, seconds = exchange(server.port, declared)
    assert status == 413 and seconds < BODY_TIMEOUT
    # chunked: refused once the streamed bytes pass the limit
    chunked = f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    chunk = b"%x\r\n" % 4096 + b"y" * 4096 + b"\r\n"
    assert exchange(server.port, chunked + chunk * (MAX_BODY // 4096 + 2))[0] == 413
    assert exchange(server.port, request(path, big, {"X-Vapi-Secret": SECRET}))[0] == 413
    # bad framing and oversized heads
    assert exchange(server.port, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n"
                    b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab")[0] == 400  # fmt: skip
    assert exchange(server.port, b"GARBAGE\r\n\r\n")[0] == 400
    huge = f"POST {path} HTTP/1.1\r\nX-Pad: {'p' * (MAX_HEAD * 4)}\r\n\r\n".encode()
    assert exchange(server.port, huge)[0] in (400, 431)


def test_slow_requests_are_cut_at_the_deadlines(server: Server, seeded: Seeded) -> None:
    path = f"/webhooks/{seeded.provider_ids['vapi']}"
    # a body that never arrives in full: 408 at the body deadline
    partial = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n".encode() + b"{"
    status, seconds = exchange(server.port, partial)
    assert status == 408 and seconds < ANSWER_WITHIN
    # a head trickled one byte at a time (slowloris): cut at the head deadline
    start = time.monotonic()
    cut: float | None = None
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        for byte in b"POST " + path.encode() + b" HTTP/1.1\r\nX-Slow: " + b"a" * 200:
            if select.select([sock], [], [], 0.05)[0]:  # the server answered or closed
                cut = time.monotonic() - start
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = time.monotonic() - start
                break
    assert cut is not None and cut < HEAD_TIMEOUT + 2.0


def test_half_open_connections_do_not_exhaust_the_server(
    server: Server, seeded: Seeded, broker: redis.Redis
) -> None:
    path = f"/webhooks/{seeded.provider_ids['vapi']}"
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    partial = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    try:
        for sock in partial:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Len".encode())
        # the hundred held connections cost the server nothing: a real delivery gets through
        status, seconds = exchange(
            server.port, request(path, vapi_body("call-live"), {"X-Vapi-Secret": SECRET})
        )
        assert status == 200 and seconds < 1.0
        # and every held connection is closed by the server at the head deadline
        deadline = time.monotonic() + ANSWER_WITHIN
        for sock in idle + partial:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(4096):
                    pass
    finally:
        for sock in idle + partial:
            sock.close()
    assert time.monotonic() < deadline + 0.5


# -- fuzzing --------------------------------------------------------------------------------------

AUTHS = ["none", "wrong", "header", "bearer", "hmac", "hmac_no_ts", "hmac_stale", "hmac_other"]
VALID_AUTHS = {"header", "bearer", "hmac"}
FRAMINGS = ["exact"] * 6 + ["short", "negative", "text", "double", "chunked", "bad_chunk", "long"]


@st.composite
def deliveries(draw: st.DrawFn) -> dict[str, Any]:
    provider = draw(st.sampled_from(["vapi", "synthflow"]))
    call_id = f"fz-{draw(st.uuids()).hex[:12]}"
    body = vapi_body(call_id) if provider == "vapi" else synthflow_body(call_id)
    mutate = draw(st.sampled_from(["none"] * 4 + ["junk", "cut", "append", "replace"]))
    if mutate == "junk":
        body = draw(st.binary(max_size=300))
    elif mutate == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif mutate == "append":
        body += draw(st.binary(min_size=1, max_size=50))
    elif mutate == "replace":
        body = body.replace(b"call", draw(st.sampled_from([b"\x00", b"\xff\xfe", b'"', b""])))
    return {
        "provider": provider,
        "call_id": call_id,
        "body": body,
        "auth": draw(st.sampled_from(AUTHS)),
        "framing": draw(st.sampled_from(FRAMINGS)),
        "extra": draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["X-Junk", "Expect", "Connection", "Content-Type", "X-A"]),
                    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                ),
                max_size=3,
            )
        ),
    }


def auth_headers(d: dict[str, Any]) -> dict[str, str]:
    body, auth = d["body"], d["auth"]
    now = str(int(time.time()))
    if d["provider"] == "synthflow":
        sign_id = d["call_id"] if auth in VALID_AUTHS else d["call_id"] + "x"
        return {} if auth == "none" else {"Synthflow-Signature": synthflow_signature(sign_id)}
    return {
        "none": {},
        "wrong": {"X-Vapi-Secret": SECRET + "x"},
        "header": {"X-Vapi-Secret": SECRET},
        "bearer": {"Authorization": f"Bearer {SECRET}"},
        "hmac": {"x-signature": vapi_hmac(body, now), "x-timestamp": now},
        "hmac_no_ts": {"x-signature": hmac.new(SECRET.encode(), body, "sha256").hexdigest()},
        "hmac_stale": {"x-signature": vapi_hmac(body, "1000"), "x-timestamp": "1000"},
        "hmac_other": {"x-signature": vapi_hmac(body + b"!", now), "x-timestamp": now},
    }[auth]


def framed(d: dict[str, Any], path: str) -> bytes:
    body, framing = d["body"], d["framing"]
    headers = [f"{k}: {v}" for k, v in auth_headers(d).items()]
    headers += [f"{k}: {v}" for k, v in d["extra"] if k != "Expect"]
    length = {
        "exact": str(len(body)),
        "short": str(max(0, len(body) - 3)),
        "negative": "-1",
        "text": "ten",
        "long": str(len(body) + 10),
    }.get(framing)
    if framing == "double":
        headers += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
    elif framing in ("chunked", "bad_chunk"):
        headers.append("Transfer-Encoding: chunked")
        size = b"%x" % len(body) if framing == "chunked" else b"zz"
        body = size + b"\r\n" + body + b"\r\n0\r\n\r\n"
    else:
        headers.append(f"Content-Length: {length}")
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\n" + "".join(h + "\r\n" for h in headers)
    return head.encode() + b"\r\n" + body


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(delivery=deliveries())
def test_fuzzed_deliveries_never_5xx_never_hang_never_accept_unsigned(
    server: Server, seeded: Seeded, broker: redis.Redis, delivery: dict[str, Any]
) -> None:
    provider_id = seeded.provider_ids[delivery["provider"]]
    status, seconds = exchange(server.port, framed(delivery, f"/webhooks/{provider_id}"))
    assert seconds < ANSWER_WITHIN
    assert status is None or 200 <= status < 500, status
    signed = delivery["auth"] in VALID_AUTHS
    if status == 200:
        assert signed, delivery
    well_formed = delivery["framing"] in ("exact", "chunked") and delivery["body"] in (
        vapi_body(delivery["call_id"]),
        synthflow_body(delivery["call_id"]),
    )
    if signed and well_formed:
        assert status == 200, delivery
    enqueued = {call_id for _, (items,), _ in queued_task_args(broker) for _, call_id in items}
    if not signed:
        assert delivery["call_id"] not in enqueued
