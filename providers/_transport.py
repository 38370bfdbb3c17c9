"""The adapters' HTTP transport: one keep-alive connection per thread and origin.

httpx's default transport (httpcore) shares one connection pool between every thread of the
worker. With the worker's lanes of threads sending creates and polls at once, that pool's lock
and condition became the hottest Python code of a burst (``bench.profile --gil``), and its
per-request work cost about twice the standard library's: a create through httpx's default
transport took 0.66-0.73 ms of the worker's CPU against 0.36-0.40 ms through this one
(``bench/notes/transport.md``). Here each thread keeps its own ``http.client`` connection per
origin, so a request takes no lock at all, and httpx still builds the request and reads the
response (headers, content decoding, the adapters' code and ``httpx.MockTransport`` in tests
are unchanged).

Errors keep httpx's meaning, which decides whether a create may be sent again
(``providers/_http.py``): a connection that could not be opened (refused, unresolvable, the
connect timeout, a failed TLS handshake) raises ``httpx.ConnectError`` / ``ConnectTimeout`` and
nothing was sent; anything after the first byte of the request went out raises a write, read or
protocol error, and a create's outcome is then unknown. A kept connection that the server
closed while idle is noticed before it is used (its socket reads as closed) and replaced.
"""

from __future__ import annotations

import functools
import http.client
import os
import select
import ssl
import threading
import urllib.request
import weakref
from typing import Any

import httpx

_Origin = tuple[str, str, int]


class ThreadLocalTransport(httpx.BaseTransport):
    """HTTP/1.1 over ``http.client``: a keep-alive connection per (thread, origin)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._local = threading.local()
        # every open connection, for close(); weak: a thread that ends takes its own with it
        self._all: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self._lock = threading.Lock()  # only around opening and closing connections
        self._closed = False
        self._pid = os.getpid()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("transport closed", request=request)
        timeouts = request.extensions.get("timeout", {})
        origin = (request.url.scheme, request.url.host, request.url.port or _default_port(request))
        conn = self._connection(origin, timeouts.get("connect"), request)
        sock = conn.sock
        assert sock is not None
        try:
            sock.settimeout(timeouts.get("write"))
            _send(conn, request)
        except ValueError:
            # http.client refused a header (a control character) before sending anything; its
            # text quotes the value, which may be a key
            self._drop(origin, conn)
            raise httpx.LocalProtocolError("invalid request header", request=request) from None
        except BaseException as exc:
            self._drop(origin, conn)
            raise _mapped(exc, request, httpx.WriteTimeout, httpx.WriteError) from None
        try:
            sock.settimeout(timeouts.get("read"))
            response = conn.getresponse()
            content = response.read()
        except BaseException as exc:
            self._drop(origin, conn)
            raise _mapped(exc, request, httpx.ReadTimeout, httpx.RemoteProtocolError) from None
        if response.will_close:
            self._drop(origin, conn)
        return httpx.Response(
            response.status,
            headers=response.getheaders(),
            stream=httpx.ByteStream(content),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason.encode()},
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = list(self._all), weakref.WeakSet()
        for conn in conns:
            conn.close()

    def _connection(
        self, origin: _Origin, timeout: float | None, request: httpx.Request
    ) -> http.client.HTTPConnection:
        """This thread's open connection to ``origin``, or a new one."""
        if self._pid != os.getpid():
            self._forget_parent()
        conns: _ThreadConns = self._local.__dict__.setdefault("conns", _ThreadConns())
        conn = conns.get(origin)
        if conn is not None and _usable(conn):
            return conn
        if conn is not None:
            self._drop(origin, conn)
        conn = self._open(origin, timeout, request)
        conns[origin] = conn
        return conn

    def _open(
        self, origin: _Origin, timeout: float | None, request: httpx.Request
    ) -> http.client.HTTPConnection:
        scheme, host, port = origin
        conn: http.client.HTTPConnection
        if scheme == "https":
            context = self._ssl_context or _default_ssl_context()
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        elif scheme == "http":
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        else:
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}", request=request)
        try:
            conn.connect()  # TCP (and TLS): nothing of the request has been sent yet
        except TimeoutError as exc:
            conn.close()
            raise httpx.ConnectTimeout("connect timed out", request=request) from exc
        except OSError as exc:  # refused, unresolvable, a failed TLS handshake (ssl.SSLError)
            conn.close()
            message = f"could not connect ({type(exc).__name__})"
            raise httpx.ConnectError(message, request=request) from exc
        with self._lock:
            self._all.add(conn)
        return conn

    def _forget_parent(self) -> None:
        """In a forked child: never share the parent's sockets (both would read one stream).
        Their copies here are only let go of; the parent's connections stay open."""
        with self._lock:
            self._pid = os.getpid()
            self._all = weakref.WeakSet()
            self._local = threading.local()

    def _drop(self, origin: _Origin, conn: http.client.HTTPConnection) -> None:
        conns: dict[_Origin, http.client.HTTPConnection] = self._local.__dict__.get("conns", {})
        if conns.get(origin) is conn:
            del conns[origin]
        with self._lock:
            self._all.discard(conn)
        conn.close()


class _ThreadConns(dict[_Origin, http.client.HTTPConnection]):
    """One thread's connections, closed when the thread ends (its thread-local data goes)."""

    def __del__(self) -> None:
        for conn in self.values():
            conn.close()


def _send(conn: http.client.HTTPConnection, request: httpx.Request) -> None:
    """The request as httpx built it: its headers (Host included) and its body."""
    target = request.url.raw_path.decode("ascii")
    conn.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
    for name, value in request.headers.raw:
        conn.putheader(name.decode("latin-1"), value.decode("latin-1"))
    body = request.read()
    conn.endheaders(body or None)


def _usable(conn: http.client.HTTPConnection) -> bool:
    """An idle kept connection is usable when its socket has nothing to read: a server that
    closed it (keep-alive timeout) makes it readable (EOF)."""
    sock = conn.sock
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)


def _mapped(
    exc: BaseException,
    request: httpx.Request,
    timeout: type[httpx.TimeoutException],
    error: type[httpx.TransportError],
) -> BaseException:
    """An error once the connection was open, as httpx names it (never a connect error: some
    of the request may have reached the server). The text carries the error's type only, and
    it is raised without its cause: http.client's texts quote what was sent or received (a
    header's value, a status line)."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: as they are
        return exc
    if isinstance(exc, TimeoutError):
        return timeout(f"timed out ({type(exc).__name__})", request=request)
    return error(f"connection failed ({type(exc).__name__})", request=request)


def _default_port(request: httpx.Request) -> int:
    return 443 if request.url.scheme == "https" else 80


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """httpx's own default verification (certifi's bundle), made once."""
    return httpx.create_ssl_context()


def new_client(**kwargs: Any) -> httpx.Client:
    """The adapters' default client: over ``ThreadLocalTransport``, or over httpx's own
    transport when the environment names an HTTP proxy (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``ALL_PROXY``), which only httpx's transport goes through."""
    if _environment_proxy():
        return httpx.Client(**kwargs)
    return httpx.Client(transport=ThreadLocalTransport(), **kwargs)


def _environment_proxy() -> bool:
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))
