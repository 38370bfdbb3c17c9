"""The ``callq`` command line.

    callq db upgrade                 apply pending migrations to DATABASE_URL
    callq queue                      queue counts, oldest due call, provider slots and health
    callq campaigns [--all]          each campaign's progress (counts, answer rate, minutes, cost)
    callq demo [--calls N] [--keep]  the whole system on this machine against the simulator
    callq simulate-providers         the Vapi/SynthFlow simulator (--port, --seed, --config)
    callq webhooks                   the provider webhook endpoint
    callq metrics [--port N]         Prometheus metrics read from the database
    callq providers add|sync|list|disable   providers as configuration
    callq worker|beat|flower [...]   Celery processes with callq's app (extra args go to Celery)

Errors end with a non-zero exit and one readable line on stderr. A command that needs the
database refuses to start without DATABASE_URL, or on a database without callq's schema.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from providers.errors import CallqError, ConfigError
from worker.settings import get_settings

CELERY_COMMANDS = {
    "worker": [
        "worker",
        "-Q",
        "dispatch,track,maintenance",
        "--without-gossip",
        "--without-mingle",
    ],
    "beat": ["beat"],
    "flower": ["flower"],
}
CELERY_HELP = {
    "worker": "a Celery worker (supervised: restarted after an exit it did not ask for)",
    "beat": "Celery beat: the claim tick and maintenance (LISTEN too with CALLQ_LISTEN_IN=beat)",
    "flower": "Flower, the Celery UI (FLOWER_BASIC_AUTH=user:password)",
}
# Commands whose processes need the database (and its schema) before they start.
NEEDS_DATABASE = frozenset({"worker", "beat"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``callq`` script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in CELERY_COMMANDS:
            return _celery(args[0], args[1:])
        parser = _parser()
        ns = parser.parse_args(args)
        if not hasattr(ns, "func"):
            parser.print_help()
            return 2
        return int(ns.func(ns) or 0)
    except CallqError as exc:
        print(f"callq: error: {exc}", file=sys.stderr)
        return 2
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction) as exc:
        print(f"callq: error: {_no_schema(_first_line(exc))}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"callq: database error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callq", description="callq: outbound AI call fleet")
    sub = parser.add_subparsers(metavar="command")

    db = sub.add_parser("db", help="database migrations")
    db_sub = db.add_subparsers(metavar="action")
    up = db_sub.add_parser("upgrade", help="apply pending migrations")
    up.set_defaults(func=_db_upgrade)

    queue = sub.add_parser("queue", help="show queue and provider state")
    queue.set_defaults(func=_queue)

    camps = sub.add_parser("campaigns", help="show each campaign's progress")
    camps.add_argument("--all", action="store_true", help="also campaigns that ended long ago")
    camps.add_argument("--limit", type=int, default=50, help="newest N campaigns (default 50)")
    camps.set_defaults(func=_campaigns)

    demo = sub.add_parser("demo", help="run the whole system against the simulator")
    demo.add_argument("--calls", type=int, default=40, help="calls to schedule (default 40)")
    demo.add_argument("--timeout", type=float, default=180.0, help="seconds to wait at most")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--keep", action="store_true", help="leave the stack running after the summary (Ctrl-C)"
    )
    demo.set_defaults(func=_demo)

    sim = sub.add_parser("simulate-providers", help="run the provider simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument("--config", default=None, help="JSON file with simulator settings")
    sim.set_defaults(func=_simulate)

    hooks = sub.add_parser("webhooks", help="serve provider webhooks")
    hooks.add_argument("--host", default=None)
    hooks.add_argument("--port", type=int, default=None)
    hooks.set_defaults(func=_webhooks)

    metrics = sub.add_parser("metrics", help="serve Prometheus metrics read from the database")
    metrics.add_argument("--host", default="0.0.0.0")
    metrics.add_argument("--port", type=int, default=9108)
    metrics.set_defaults(func=_metrics)

    prov = sub.add_parser("providers", help="register, list and disable providers")
    prov_sub = prov.add_subparsers(metavar="action")
    add = prov_sub.add_parser("add", help="add or update one provider (by name)")
    add.add_argument("--name", required=True)
    add.add_argument("--type", required=True, help="vapi, synthflow, retell or a plug-in")
    add.add_argument("--base-url", required=True)
    add.add_argument("--api-key", required=True, help="env:CALLQ_SECRET_... (or a literal)")
    add.add_argument("--webhook-secret", default=None, help="env:CALLQ_SECRET_...")
    add.add_argument("--max-calls", type=int, default=10, dest="max_concurrent_calls")
    add.add_argument("--priority", type=int, default=5, help="1 (preferred) .. 100")
    add.add_argument("--config", default="{}", help="the adapter's config, a JSON object")
    add.set_defaults(func=_providers_add)
    sync = prov_sub.add_parser("sync", help="add or update every provider of a JSON list")
    sync.add_argument("file", nargs="?", default=None, help="a JSON file, - for stdin;"
                      " default: $CALLQ_PROVIDERS")  # fmt: skip
    sync.set_defaults(func=_providers_sync)
    lst = prov_sub.add_parser("list", help="providers, their slots and state (no keys)")
    lst.set_defaults(func=_providers_list)
    dis = prov_sub.add_parser("disable", help="stop new calls to a provider")
    dis.add_argument("name")
    dis.set_defaults(func=_providers_disable)

    # Listed for --help; main() hands these to Celery before argparse sees them.
    for name, text in CELERY_HELP.items():
        sub.add_parser(name, help=f"{text}; extra arguments go to Celery", add_help=False)
    return parser


def require_database(*, schema: bool = True) -> str:
    """The database URL, checked: set, answering, and (``schema``) migrated. Raises a
    ConfigError with one readable line otherwise."""
    from models.session import connect

    s = get_settings()
    url = s.require_database_url()
    if schema:
        with connect(url, pooled=s.database_pooler, connect_timeout=10) as conn:
            row = conn.execute("SELECT to_regclass('public.call_queue') IS NOT NULL").fetchone()
        if not (row and row[0]):
            raise ConfigError(_no_schema("the database has no call_queue table"))
    return url


def _no_schema(detail: str) -> str:
    return f"{detail}: callq's schema is missing; run `callq db upgrade` first"


def _db_upgrade(_: argparse.Namespace) -> int:
    from models.migrate import upgrade

    s = get_settings()
    applied = upgrade(require_database(schema=False), pooled=s.database_pooler)
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def _queue(_: argparse.Namespace) -> int:
    from worker.status import print_queue

    print_queue(require_database(), get_settings().database_pooler)
    return 0


def _campaigns(ns: argparse.Namespace) -> int:
    from worker.status import print_campaigns

    print_campaigns(require_database(), get_settings().database_pooler, all_=ns.all, limit=ns.limit)
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(calls=ns.calls, timeout=ns.timeout, seed=ns.seed, keep=ns.keep)


def _simulate(ns: argparse.Namespace) -> int:
    from providers.simulator.__main__ import main as sim_main

    extra = ["--host", ns.host, "--port", str(ns.port)]
    if ns.seed is not None:
        extra += ["--seed", str(ns.seed)]
    if ns.config:
        extra += ["--config", ns.config]
    return int(sim_main(extra) or 0)


def _webhooks(ns: argparse.Namespace) -> int:
    from worker import logs
    from worker.webhooks import server

    s = get_settings()
    require_database()
    logs.configure_logging(s.log_level, s.log_json)
    uv = server(s, ns.host, ns.port)
    print(
        f"callq webhooks listening on http://{uv.config.host}:{uv.config.port}"
        "/webhooks/<provider_id>",
        flush=True,
    )
    uv.run()
    return 0 if uv.started else 1


def _providers_apply(specs: list[Any]) -> int:
    from models.session import connect
    from worker.providers_cli import apply

    s = get_settings()
    with connect(require_database(), pooled=s.database_pooler, autocommit=True) as conn:
        return apply(conn, specs, s)


def _providers_add(ns: argparse.Namespace) -> int:
    from worker.providers_cli import ProviderSpec

    try:
        config = json.loads(ns.config)
    except json.JSONDecodeError as exc:
        raise ConfigError("--config: not JSON") from exc
    raw = {k: getattr(ns, k) for k in ("name", "type", "base_url", "api_key", "webhook_secret",
                                        "max_concurrent_calls", "priority")}  # fmt: skip
    return _providers_apply([ProviderSpec.from_mapping({**raw, "config": config}, "--config")])


def _providers_sync(ns: argparse.Namespace) -> int:
    from worker.providers_cli import load_specs

    return _providers_apply(load_specs(ns.file))


def _providers_list(_: argparse.Namespace) -> int:
    from models.session import connect
    from worker.providers_cli import list_providers

    s = get_settings()
    with connect(require_database(), pooled=s.database_pooler, autocommit=True) as conn:
        print(list_providers(conn))
    return 0


def _providers_disable(ns: argparse.Namespace) -> int:
    from models.session import connect
    from worker.providers_cli import disable

    s = get_settings()
    with connect(require_database(), pooled=s.database_pooler, autocommit=True) as conn:
        return disable(conn, ns.name)


def _metrics(ns: argparse.Namespace) -> int:
    from worker.metrics import serve_metrics

    s = get_settings()
    url = require_database()
    server = serve_metrics(url, ns.host, ns.port, pooled=s.database_pooler, ping=bool(s.broker_url))
    host, port = server.server_address[:2]
    print(f"callq metrics on http://{host!s}:{port}/metrics", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _celery(command: str, extra: list[str]) -> int:
    """Run Celery with callq's app. A worker is supervised: restarted when it dies on its own."""
    asking_help = "--help" in extra or "-h" in extra
    if command in NEEDS_DATABASE and not asking_help:
        require_database()
    argv = [sys.executable, "-m", "celery", "-A", "worker", *CELERY_COMMANDS[command], *extra]
    pool = requested_pool(extra) if command == "worker" else None
    if pool is not None:
        # Celery takes "-P prefork" (its own default) as "no pool asked for" and uses the
        # configured worker_pool (CALLQ_WORKER_POOL, threads): the setting follows the flag.
        os.environ["CALLQ_WORKER_POOL"] = pool
    if command != "worker" or asking_help:
        os.execv(sys.executable, argv)
    return supervise(argv)


def requested_pool(args: list[str]) -> str | None:
    """The pool a worker's arguments ask for (``-P x``, ``-Px``, ``--pool x``, ``--pool=x``;
    the last one wins), or None."""
    pool = None
    for i, arg in enumerate(args):
        if arg in ("-P", "--pool") and i + 1 < len(args):
            pool = args[i + 1]
        elif arg.startswith("--pool="):
            pool = arg.split("=", 1)[1]
        elif arg.startswith("-P") and len(arg) > 2:
            pool = arg[2:]
    return pool


def supervise(argv: list[str], *, max_restarts_per_minute: int = 10) -> int:
    """Run ``argv``; restart it after an exit we did not ask for (a crash, a broker bug).

    SIGTERM and SIGINT are passed on and end supervision, so a warm shutdown stays a warm
    shutdown. PostgreSQL holds every call, so a restarted worker just picks the work up again.
    """
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    starts: list[float] = []
    while True:
        starts = [t for t in starts if time.monotonic() - t < 60] + [time.monotonic()]
        child = subprocess.Popen(argv)
        code = child.wait()
        if stopping or code == 0:
            return code
        if len(starts) > max_restarts_per_minute:
            print(f"callq: error: worker exited {len(starts)} times in a minute", file=sys.stderr)
            return code or 1
        print(f"callq: worker exited with code {code}; restarting", file=sys.stderr, flush=True)
        time.sleep(1.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
