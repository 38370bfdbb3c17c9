"""Database URLs and connections for the worker and admin scripts (psycopg 3, SQLAlchemy 2).

Behind a transaction pooler (Supabase's pooler on port 6543, pgbouncer in transaction mode) a
connection's statements may run on a different server session at every transaction, so no
server-side prepared statements (psycopg prepares a query by itself after five executions) and
no session state may be used. :func:`is_pooled` tells from the URL (port 6543, or
``?pgbouncer=true``, which is then removed: libpq does not know it) unless the caller knows
better (``CALLQ_DATABASE_POOLER``); :func:`connect_kwargs` gives every connection and pool the
matching options.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from sqlalchemy import Engine, create_engine

# Supabase's transaction pooler (Supavisor) listens on 6543; its session pooler on 5432.
POOLER_PORTS = frozenset({6543})
_POOLER_FLAG = "pgbouncer"

_DRIVER_PREFIXES = ("postgresql+psycopg2://", "postgresql+asyncpg://", "postgresql+psycopg://")


def normalize_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver: ``postgres://``/``postgresql://`` ->
    ``postgresql+psycopg://`` (libpq query strings such as ``?host=/tmp/x`` are kept)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    for prefix in _DRIVER_PREFIXES:
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def libpq_url(url: str) -> str:
    """The plain libpq form of a (possibly SQLAlchemy-style) URL, for psycopg.connect(); a
    ``pgbouncer`` query parameter is dropped."""
    for prefix in _DRIVER_PREFIXES:
        if url.startswith(prefix):
            url = "postgresql://" + url[len(prefix) :]
            break
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != _POOLER_FLAG]
    if len(query) != len(parse_qsl(parts.query, keep_blank_values=True)):
        url = urlunsplit(parts._replace(query=urlencode(query)))
    return url


def rewrite_url(url: str, *, dbname: str | None = None, user: str | None = None) -> str:
    """``url`` (a libpq URL or ``key=value`` string) on another database and/or as another
    user (whose password is then dropped): host, port and password otherwise kept, a Unix
    socket directory in the query. The one URL rewriter of the tests, benchmarks and drills."""
    info = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(url).items() if v}
    if dbname is not None:
        info["dbname"] = dbname
    if user is not None:
        info["user"] = user
        info.pop("password", None)
    auth = quote(info.get("user", "postgres"), safe="")
    if info.get("password"):
        auth += ":" + quote(info["password"], safe="")
    host, port = info.get("host", ""), info.get("port", "")
    params = {k: v for k, v in info.items() if k not in ("user", "password", "dbname")}
    if host.startswith("/"):  # a socket directory cannot be the URL's host
        host = port = ""
    else:
        params = {k: v for k, v in params.items() if k not in ("host", "port")}
    netloc = host + (f":{port}" if port else "")
    query = f"?{urlencode(params, safe='/')}" if params else ""
    return f"postgresql://{auth}@{netloc}/{quote(info.get('dbname', ''), safe='')}{query}"


def is_pooled(url: str, setting: bool | None = None) -> bool:
    """Whether ``url`` goes through a transaction pooler: ``setting`` when given, else port
    6543 or ``?pgbouncer=true`` in the URL."""
    if setting is not None:
        return setting
    parts = urlsplit(url)
    flags = dict(parse_qsl(parts.query))
    if flags.get(_POOLER_FLAG, "").lower() in ("1", "true", "yes"):
        return True
    try:
        port = parts.port
    except ValueError:
        return False
    return port in POOLER_PORTS or flags.get("port") in {str(p) for p in POOLER_PORTS}


def connect_kwargs(url: str, pooled: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for psycopg.connect() / a pool's ``kwargs`` on ``url``: behind a pooler,
    ``prepare_threshold=None`` (never prepare on the server)."""
    return {"prepare_threshold": None} if is_pooled(url, pooled) else {}


def connect(
    url: str, *, pooled: bool | None = None, **kwargs: Any
) -> psycopg.Connection[tuple[Any, ...]]:
    """psycopg.connect() on ``url`` with the options its pooling calls for."""
    return psycopg.connect(libpq_url(url), **{**connect_kwargs(url, pooled), **kwargs})


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine on ``url`` with pre-ping; extra keyword arguments go to ``create_engine``."""
    kwargs.setdefault("pool_pre_ping", True)
    if is_pooled(url):
        kwargs.setdefault("connect_args", {}).update(connect_kwargs(url, True))
    return create_engine(normalize_url(libpq_url(url)), **kwargs)
