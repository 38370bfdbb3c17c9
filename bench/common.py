"""Shared pieces of the benchmarks and drills: scratch databases, own servers, the simulator.

Everything here is started on loopback by us and stopped by us. The machine's shared PostgreSQL
is only used to create and drop scratch databases (``callq_bench_<random>``); anything that is
stopped, killed or restarted on purpose is a server of our own on a port of our own.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from models.session import rewrite_url

REPO = Path(__file__).resolve().parents[1]
PG_BIN = Path(os.environ.get("CALLQ_PG_BIN", "/usr/lib/postgresql/15/bin"))
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

if str(REPO) not in sys.path:  # pragma: no cover - when run as a file
    sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- URLs and scratch databases -----------------------------------------------------------------


def url_parts(url: str) -> dict[str, str]:
    info = psycopg.conninfo.conninfo_to_dict(url)
    return {k: str(v) for k, v in info.items() if v is not None}


def migrate(url: str) -> None:
    """Apply every migration through the project's migrator (plain files when it is missing)."""
    try:
        from models.migrate import upgrade
    except ImportError:
        _apply_files(url)
        return
    upgrade(url)


def _apply_files(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        has_auth = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'auth'").fetchone()
        files = [] if has_auth else [REPO / "supabase" / "local" / "auth.sql"]
        files += sorted((REPO / "supabase" / "migrations").glob("*.sql"))
        for path in files:
            conn.execute(path.read_text())  # type: ignore[call-overload]


@dataclass
class ScratchDB:
    """A database ``callq_bench_<random>`` on a server we may share; dropped by :meth:`drop`."""

    admin_url: str = ADMIN_URL
    # BENCH_DB_PREFIX: several checkouts sharing one server each use their own prefix
    prefix: str = os.environ.get("BENCH_DB_PREFIX", "callq_bench")
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"{self.prefix}_{uuid.uuid4().hex[:10]}"

    @property
    def url(self) -> str:
        return rewrite_url(self.admin_url, dbname=self.name)

    def create(self, *, migrated: bool = True) -> str:
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        if migrated:
            migrate(self.url)
        return self.url

    def drop(self) -> None:
        drop = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.name))
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn,
        ):
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (self.name,),
            )
            conn.execute(drop)


@contextlib.contextmanager
def scratch_db(admin_url: str = ADMIN_URL, *, migrated: bool = True) -> Iterator[ScratchDB]:
    db = ScratchDB(admin_url)
    db.create(migrated=migrated)
    try:
        yield db
    finally:
        db.drop()


# -- A PostgreSQL server of our own (for drills that stop or restart it) ------------------------


@dataclass
class OwnPostgres:
    """initdb + pg_ctl into a temp dir, run as the ``postgres`` OS user, on a port of ours."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="callq-pg-")))
    port: int = 0

    def __post_init__(self) -> None:
        if not self.port:
            from worker.embedded import free_port

            self.port = free_port()

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        user = "postgres"
        preexec: Callable[[], None] | None = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam(user)

            def preexec() -> None:
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

        env = {**os.environ, "LC_ALL": "C.UTF-8", "HOME": str(self.root)}
        return subprocess.run(
            args,
            preexec_fn=preexec,
            env=env,
            cwd=str(self.root),
            capture_output=True,
            timeout=timeout,
            check=True,
        )

    def init(self) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o755)
        self._run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                "max_connections = 200\nshared_buffers = 128MB\n"
            )

    def start(self) -> str:
        if not self.datadir.exists():
            self.init()
        self._run(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.root / "pg.log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            timeout=90,
        )
        return self.admin_url

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ],
                timeout=90,
            )

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# -- pgbouncer of our own, in transaction mode (what Supabase's pooler is) ---------------------

PGBOUNCER = os.environ.get("CALLQ_PGBOUNCER", "/usr/sbin/pgbouncer")


@dataclass
class OwnPgbouncer:
    """pgbouncer in transaction mode on a port of ours, in front of ``server_url``'s server.

    Its own config, auth file, log and pid file live in a temp dir; it runs as ``postgres``
    when we are root (pgbouncer refuses root). ``url(dbname)`` is a URL through it, marked
    ``?pgbouncer=true`` so callq treats it as a pooler.
    """

    server_url: str
    pool_size: int = 20
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="callq-pgb-")))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.port:
            from worker.embedded import free_port

            self.port = free_port()

    def url(self, dbname: str) -> str:
        user = url_parts(self.server_url).get("user", "postgres")
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}?pgbouncer=true"

    def start(self) -> OwnPgbouncer:
        server = url_parts(self.server_url)
        user = server.get("user", "postgres")
        password = server.get("password", "")
        host = server.get("host", "127.0.0.1")
        (self.root / "userlist.txt").write_text(f'"{user}" "{password}"\n')
        conf = self.root / "pgbouncer.ini"
        conf.write_text(
            "[databases]\n"
            f"* = host={host} port={server.get('port', '5432')}"
            + (f" password={password}" if password else "")
            + "\n\n[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\nmax_client_conn = 1000\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.root / 'pgbouncer.log'}\npidfile = {self.root / 'pgbouncer.pid'}\n"
            "log_connections = 1\nlog_disconnections = 0\n"
        )
        args = [PGBOUNCER, str(conf)]
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            args = [PGBOUNCER, "-u", "postgres", str(conf)]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        from worker.embedded import wait_until

        def up() -> bool:
            with contextlib.suppress(psycopg.Error):
                psycopg.connect(self.url("postgres").split("?")[0], connect_timeout=2).close()
                return True
            return False

        with contextlib.suppress(TimeoutError):
            wait_until(lambda: up() or self.proc.poll() is not None, timeout=20)
        if self.proc.poll() is not None or not up():
            self.stop()
            raise RuntimeError(f"pgbouncer did not start: {self.log()[-2000:]}")
        return self

    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


# -- Redis of our own ---------------------------------------------------------------------------


def own_redis() -> Any:
    from worker.embedded import EmbeddedRedis

    r = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="callq-redis-")))
    r.start()
    return r


def restart_redis(r: Any) -> None:
    """Stop our redis-server (data lost: no persistence) and start it again on the same port."""
    r.stop()
    r.start()


# -- The provider simulator ---------------------------------------------------------------------


@dataclass
class Simulator:
    """``python -m providers.simulator`` as a child process on a port of ours."""

    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def __post_init__(self) -> None:
        if not self.port:
            from worker.embedded import free_port

            self.port = free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: dict[str, Any] | None = None) -> str:
        from worker.embedded import wait_for_port

        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            out = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "providers.simulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=str(REPO),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, 30)
        if config:
            self.configure(config)
        return self.base_url

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def _req(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - loopback URL of ours
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw else None

    def configure(self, config: dict[str, Any]) -> Any:
        return self._req("POST", "/_sim/config", config)

    def reset(self) -> Any:
        return self._req("POST", "/_sim/reset", {})

    def stats(self, times: bool = False) -> dict[str, Any]:
        return dict(self._req("GET", "/_sim/stats" + ("?times=1" if times else "")))


# -- The fleet's environment ----------------------------------------------------------------------


def fleet_env(database_url: str, broker_url: str, **overrides: Any) -> dict[str, str]:
    """Environment for worker/beat children: fast polling, quick tracking, quiet logs."""
    env = {
        "DATABASE_URL": database_url,
        "CALLQ_DATABASE_URL": database_url,
        "CALLQ_BROKER_URL": broker_url,
        "CALLQ_POLL_INTERVAL_SECONDS": "1.0",
        "CALLQ_CLAIM_BATCH_SIZE": "100",
        "CALLQ_TRACK_INITIAL_DELAY_SECONDS": "0.5",
        "CALLQ_TRACK_MAX_DELAY_SECONDS": "5",
        "CALLQ_REAPER_INTERVAL_SECONDS": "5",
        "CALLQ_HEALTH_INTERVAL_SECONDS": "5",
        "CALLQ_RECONCILE_DELAY_SECONDS": "1",
        "CALLQ_LEASE_SECONDS": "10",
        "CALLQ_HTTP_CONNECT_TIMEOUT_SECONDS": "2",
        "CALLQ_HTTP_READ_TIMEOUT_SECONDS": "3",
        "CALLQ_LOG_LEVEL": "WARNING",
        "CALLQ_LOG_JSON": "true",
        "CALLQ_PROVIDER_ALLOWED_HOSTS": "http://127.0.0.1:*",  # the bench's own simulator
        "PYTHONPATH": str(REPO),
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


# -- Numbers --------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def sim_available() -> bool:
    try:
        import providers.simulator  # noqa: F401
    except ImportError:
        return False
    return (REPO / "providers" / "simulator" / "__main__.py").exists()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback
            return True
    except (urllib.error.URLError, OSError):
        return False
