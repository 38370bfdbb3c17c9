"""Start and stop real callq processes (Celery worker, beat) on this machine.

Used by ``callq demo``, the end-to-end tests, the benchmarks and the fault drills, so that all of
them run the same commands ops run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# From a checkout, children run in it (and import it); from an installed wheel, where REPO is
# site-packages, they run where the caller runs.
CHECKOUT = REPO if (REPO / "pyproject.toml").is_file() else None


@dataclass
class Fleet:
    """A set of child processes sharing one environment."""

    env: Mapping[str, str]
    log_dir: Path | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env}
        if CHECKOUT is not None:
            env.setdefault("PYTHONPATH", str(CHECKOUT))
        out: Any = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args,
            env=env,
            cwd=None if CHECKOUT is None else str(CHECKOUT),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_worker(
        self,
        name: str = "worker",
        *,
        queues: str = "dispatch,track,maintenance",
        pool: str = "threads",
        concurrency: int = 16,
        extra: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """A supervised Celery worker (``callq worker``) named ``name`` (node ``name@host``)."""
        args = [
            sys.executable,
            "-m",
            "worker.cli",
            "worker",
            "-Q",
            queues,
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--loglevel",
            "WARNING",
            *(extra or []),
        ]
        return self._spawn(name, args)

    def start_beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        """A Celery beat process (its ticks; the LISTEN wake-up only with CALLQ_LISTEN_IN=beat)."""
        args = [sys.executable, "-m", "celery", "-A", "worker", "beat", "--loglevel", "WARNING"]
        return self._spawn(name, args)

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Any other child (flower, webhooks, simulator)."""
        return self._spawn(name, args)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group of ``name`` (a worker and its pool)."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def stop(self, name: str | None = None, timeout: float = 15.0) -> None:
        """Warm-shut-down with SIGTERM, then SIGKILL what is left."""
        names = [name] if name else list(self.procs)
        for n in names:
            proc = self.procs.get(n)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for n in names:
            proc = self.procs.get(n)
            if proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            self.kill(n)
            self.procs.pop(n, None)
