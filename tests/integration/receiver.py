"""A small HTTP server that records webhook deliveries (for the simulator's webhooks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """Collects webhook deliveries. ``hold``, if given, sees each body before it is recorded
    and answered (a slow endpoint: it may block)."""

    def __init__(self, hold: Callable[[bytes], None] | None = None) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        received = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if hold is not None:
                    hold(body)
                received.append((dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(
        self, needle: bytes, count: int = 1, timeout: float = 5.0
    ) -> list[tuple[dict[str, str], bytes]]:
        """The deliveries whose body contains ``needle``, once there are ``count`` (or timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [d for d in list(self.deliveries) if needle in d[1]]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)
