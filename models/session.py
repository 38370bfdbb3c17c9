"""Engine construction for the worker and admin scripts (SQLAlchemy 2 over psycopg 3)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine

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
    """The plain libpq form of a (possibly SQLAlchemy-style) URL, for psycopg.connect()."""
    for prefix in _DRIVER_PREFIXES:
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    if url.startswith("postgres://"):
        return "postgresql://" + url[len("postgres://") :]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine on ``url`` with pre-ping; extra keyword arguments go to ``create_engine``."""
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(normalize_url(url), **kwargs)
