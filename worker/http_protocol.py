"""uvicorn's httptools protocol with the two limits uvicorn lacks: a request-head deadline and size.

uvicorn's ``timeout_keep_alive`` only covers idle time between requests and is reset by every
byte, so a client that opens a connection and trickles (or never sends) a request head holds a
connection, and a ``limit_concurrency`` slot, forever (uvicorn issue #157). httptools also has
no limit on the size of a request head. This subclass adds:

- a deadline for each request head: from the connection's start (for the first request) or
  from the first byte of a later one, until the head is parsed; past it, ``408`` and close
  (an idle kept-alive connection is closed silently by ``timeout_keep_alive``);
- a limit on the size of a request head: ``431`` and close while it is still incomplete,
  ``400`` and close (uvicorn's answer to a parser error) when it arrived whole in one read;
- ``TCP_NODELAY`` set explicitly, so the head and body of an answer never wait for an ACK.

The body has its own deadline and size limit in the app (``worker/webhooks.py``), enforced
while it streams in.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _answer(status: bytes, reason: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b" " + reason + b"\r\ncontent-type: text/plain\r\n"
        b"content-length: 0\r\nconnection: close\r\n\r\n"
    )


REQUEST_TIMEOUT = _answer(b"408", b"Request Timeout")
HEAD_TOO_LARGE = _answer(b"431", b"Request Header Fields Too Large")


class HeadTooLargeError(Exception):
    """A request head passed ``max_head_bytes`` (raised inside a parser callback)."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """httptools with a head deadline, a head size limit and TCP_NODELAY (see module doc)."""

    head_timeout: float = 5.0
    max_head_bytes: int = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_size = 0
        self._in_head = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0
        if self._head_timer is None:  # a later request on a kept-alive connection
            self._await_head()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        """A complete head over the limit: the parser error makes uvicorn answer 400, close."""
        self._head_size += size
        if self._head_size > self.max_head_bytes:
            raise HeadTooLargeError

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def _await_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._refuse, REQUEST_TIMEOUT)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, answer: bytes) -> None:
        """Answer and close a connection whose request head is late or too large."""
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        busy = self.cycle is not None and not self.cycle.response_complete
        if not busy:  # never write into the middle of another answer
            self.transport.write(answer)
        self.transport.close()


def protocol_class(head_timeout: float, max_head_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """A protocol class with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "CallqHttpProtocol",
        (BoundedHttpToolsProtocol,),
        {"head_timeout": head_timeout, "max_head_bytes": max_head_bytes},
    )
