"""The adapters' transport (providers/_transport.py) against a scripted HTTP server on a socket.

What the transport must keep: a connection per thread and origin, reused while the server keeps
it; a connection the server closed while idle replaced before use; and errors that keep httpx's
meaning, because the send path decides from them whether a create may go out again (only a
connect error proves nothing arrived). The server records every request it read, so a test can
count what reached it.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers._http import Sender
from providers._transport import ThreadLocalTransport, new_client
from providers.errors import ProviderOutcomeUnknownError, ProviderRetryableError
from worker.embedded import wait_until

# How the server answers a request it has read (one behaviour per request, in order):
#   ok: 200 and keep the connection; close: 200, then close the connection without saying so
#   (an idle keep-alive timeout); says_close: 200 with "Connection: close"; drop: close without
#   answering; partial: half a response, then close; stall: answer nothing until released.
BEHAVIOURS = ("ok", "close", "says_close", "drop", "partial")


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Script:
    """A socket server that answers each request by the next behaviour of its script."""

    behaviours: list[str] = field(default_factory=list)
    default: str = "ok"
    seen: list[Seen] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # the behaviour that answered each one
    closed: int = 0  # connections this server closed
    accepted: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    ssl_context: ssl.SSLContext | None = None
    body: bytes = b'{"id": "c1", "status": "queued"}'
    chunked_gzip: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self._sock.close()
        for conn in self._conns:
            conn.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self.ssl_context is not None:
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()
                    continue
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _next(self) -> str:
        with self._lock:
            behaviour = self.behaviours.pop(0) if self.behaviours else self.default
            self.answers.append(behaviour)
            return behaviour

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                seen = _read_request(reader)
                if seen is None:
                    return
                with self._lock:
                    self.seen.append(seen)
                if not self._answer(conn, self._next()):
                    return
        except OSError:
            return
        finally:
            reader.close()
            conn.close()
            with self._lock:
                self.closed += 1

    def _answer(self, conn: socket.socket, behaviour: str) -> bool:
        """Answer by ``behaviour``; False when the connection ends here."""
        if behaviour == "stall":
            self.release.wait(10)
            return False
        if behaviour == "drop":
            return False
        response = self._response(close=behaviour == "says_close")
        if behaviour == "partial":
            conn.sendall(response[: len(response) - 5])
            return False
        conn.sendall(response)
        return behaviour == "ok"

    def _response(self, *, close: bool) -> bytes:
        head = ["HTTP/1.1 200 OK", "Content-Type: application/json"]
        if close:
            head.append("Connection: close")
        if self.chunked_gzip:
            data = gzip.compress(self.body)
            half = len(data) // 2
            head += ["Content-Encoding: gzip", "Transfer-Encoding: chunked"]
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(part), part) for part in (data[:half], data[half:])
            )
            return ("\r\n".join(head) + "\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
        head.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


def _read_request(reader: BinaryIO) -> Seen | None:
    readline = reader.readline
    line = readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        raw = readline().decode("latin-1").rstrip("\r\n")
        if not raw:
            break
        name, value = raw.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = reader.read(length) if length else b""
    return Seen(method, target, headers, body)


@pytest.fixture
def server() -> Iterator[Script]:
    script = Script()
    yield script
    script.close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with new_client(timeout=httpx.Timeout(2.0, connect=2.0)) as c:
        yield c


def _url(script: Script, path: str = "/call", scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{script.port}{path}"


def test_sends_the_request_httpx_built_and_reads_the_response(
    server: Script, client: httpx.Client
) -> None:
    response = client.post(
        _url(server, "/call?limit=5&a=%20b"),
        json={"customer": {"number": "+14155550100"}},
        headers={"Authorization": "Bearer k"},
    )
    assert response.status_code == 200
    assert response.json() == {"id": "c1", "status": "queued"}
    assert response.headers["content-type"] == "application/json"
    assert response.http_version == "HTTP/1.1"
    (seen,) = server.seen
    assert (seen.method, seen.target) == ("POST", "/call?limit=5&a=%20b")
    assert seen.headers["host"] == f"127.0.0.1:{server.port}"
    assert seen.headers["authorization"] == "Bearer k"
    assert seen.headers["content-type"] == "application/json"
    assert json.loads(seen.body) == {"customer": {"number": "+14155550100"}}
    assert int(seen.headers["content-length"]) == len(seen.body)


def test_chunked_and_gzipped_responses_are_decoded(server: Script, client: httpx.Client) -> None:
    server.chunked_gzip = True
    server.body = json.dumps({"id": "c2", "transcript": "x" * 5000}).encode()
    assert client.get(_url(server)).json()["transcript"] == "x" * 5000
    assert client.get(_url(server)).json()["id"] == "c2"  # the connection was kept
    assert server.accepted == 1


def test_one_connection_per_thread_kept_across_requests(
    server: Script, client: httpx.Client
) -> None:
    for _ in range(10):
        client.get(_url(server)).raise_for_status()
    assert server.accepted == 1

    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait(5)
            for _ in range(10):
                client.get(_url(server)).raise_for_status()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert server.accepted == 5  # this thread's, and one for each new thread
    assert len(server.seen) == 50


def test_a_connection_the_server_closed_while_idle_is_replaced(
    server: Script, client: httpx.Client
) -> None:
    server.behaviours = ["close", "says_close", "ok"]
    for k in range(4):
        assert client.get(_url(server)).status_code == 200
        # the server's close has happened before the next request (as an idle timeout would:
        # a request sent in the same instant may fail, outcome unknown, which the property
        # test below allows)
        wait_until(lambda k=k: server.closed >= min(k + 1, 2), timeout=5, interval=0.005)
    assert server.accepted == 3  # after "close" and after "says_close"
    assert len(server.seen) == 4  # nothing was sent twice


def test_refused_connection_is_a_connect_error(client: httpx.Client) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(httpx.ConnectError):
            client.get(f"http://127.0.0.1:{port}/call")


def test_stalled_response_is_a_read_timeout_and_the_connection_is_dropped(
    server: Script,
) -> None:
    server.behaviours = ["stall"]
    with new_client(timeout=httpx.Timeout(0.3, connect=2.0)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get(_url(server))
        server.release.set()
        assert c.get(_url(server)).status_code == 200
    assert server.accepted == 2


@pytest.mark.parametrize("behaviour", ["drop", "partial"])
def test_a_create_that_reached_the_server_is_never_sent_again(
    server: Script, client: httpx.Client, behaviour: str
) -> None:
    server.behaviours = [behaviour]
    sender = Sender("vapi", client, headers={}, sleep=lambda _: None)
    with pytest.raises(ProviderOutcomeUnknownError):
        sender.request("POST", _url(server), json_body={"a": 1}, create=True)
    assert len(server.seen) == 1


def test_a_create_that_could_not_connect_is_retried(client: httpx.Client) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/call"
        sender = Sender("vapi", client, headers={}, max_attempts=3, sleep=lambda _: None)
        with pytest.raises(ProviderRetryableError) as info:
            sender.request("POST", url, json_body={"a": 1}, create=True)
    assert not isinstance(info.value, ProviderOutcomeUnknownError)
    assert info.value.code == "ConnectError"


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=12))
def test_any_server_behaviour_each_request_reaches_it_at_most_once(
    behaviours: list[str],
) -> None:
    """Whatever the server does, a request is read by it at most once, a connect error means it
    read nothing of it, a success is the answer to it, and every other failure is one httpx
    names as 'may have arrived'. (A request sent on a connection the server is closing at that
    moment fails without reaching it: the script's next behaviour then answers the next one.)"""
    script = Script(behaviours=list(behaviours))
    try:
        with new_client(timeout=httpx.Timeout(2.0, connect=2.0)) as c:
            for k in range(len(behaviours)):
                before = len(script.seen)
                try:
                    response = c.post(_url(script), json={"k": k})
                except httpx.ConnectError:
                    assert len(script.seen) == before
                    continue
                except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
                    assert len(script.seen) - before <= 1
                    continue
                assert response.status_code == 200
                assert len(script.seen) == before + 1
                assert json.loads(script.seen[-1].body)["k"] == k
                assert script.answers[-1] in ("ok", "close", "says_close")
        bodies = [json.loads(s.body)["k"] for s in script.seen]
        assert len(bodies) == len(set(bodies))
    finally:
        script.close()


def test_tls_verified_against_the_given_context(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert, key)
    script = Script(ssl_context=served)
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(transport=ThreadLocalTransport(ssl_context=trusted)) as c:
            assert c.get(_url(script, scheme="https")).json()["id"] == "c1"
            assert c.get(_url(script, scheme="https")).status_code == 200
        assert script.accepted == 1
        # the default bundle does not know this certificate
        with new_client() as untrusting, pytest.raises(httpx.ConnectError):
            untrusting.get(_url(script, scheme="https"))
        assert len(script.seen) == 2
    finally:
        script.close()


def test_a_header_http_client_refuses_is_an_error_without_its_value(
    server: Script, client: httpx.Client
) -> None:
    with pytest.raises(httpx.LocalProtocolError) as info:
        client.get(_url(server), headers={"Authorization": "Bearer sk-secret\r\nX-Evil: 1"})
    assert "sk-secret" not in str(info.value)
    assert "sk-secret" not in repr(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert server.seen == []
    assert client.get(_url(server)).status_code == 200  # the next request is unaffected


def test_a_forked_child_opens_its_own_connection(server: Script, client: httpx.Client) -> None:
    assert client.get(_url(server)).status_code == 200
    pid = os.fork()
    if pid == 0:  # the child: its request must not go over the parent's socket
        code = 1
        try:
            code = 0 if client.get(_url(server)).json()["id"] == "c1" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.get(_url(server)).status_code == 200  # the parent's connection still works
    assert server.accepted == 2
    assert len(server.seen) == 3


def test_an_http_proxy_in_the_environment_is_honoured(
    server: Script, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only httpx's own transport goes through a proxy: with one configured, the adapters'
    client uses it (the proxy here is the scripted server, which sees the absolute URL)."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with new_client() as c:
        assert c.get("http://provider.invalid/call?x=1").json()["id"] == "c1"
    assert server.seen[0].target == "http://provider.invalid/call?x=1"


def test_a_thread_that_ends_lets_its_connection_go(server: Script, client: httpx.Client) -> None:
    """The transport keeps no connection of a thread that ended (threads of a pool that
    shrinks): the server sees it closed, without the transport being closed."""
    t = threading.Thread(target=lambda: client.get(_url(server)).raise_for_status())
    t.start()
    t.join(10)
    assert len(server.seen) == 1
    gc.collect()
    wait_until(lambda: server.closed >= 1, timeout=5, interval=0.01, what="the server's close")
