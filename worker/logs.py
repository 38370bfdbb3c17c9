"""Structured logs: one JSON object per event, with the call's ids bound, never its PII."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False
QUIET_LOGGERS = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "uvicorn.error": logging.ERROR,
    "uvicorn.access": logging.WARNING,
}


def configure_logging(level: str = "INFO", as_json: bool = True) -> None:
    """Route stdlib and structlog records through one renderer (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    logging.basicConfig(
        level=logging.getLevelName(level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # One line per task received and per task succeeded is Celery's chattiest output and costs
    # the consumer time on every message; callq's own events say what happened to each call.
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    # httpx and httpcore log every request URL at INFO/DEBUG; a lookup URL can carry a phone
    # number. uvicorn logs one line per malformed request: a flood would be the attacker's.
    for name, floor in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(floor, logging.getLogger().level))
    renderer: Any = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A structlog logger; log stable event names with ids as fields."""
    return structlog.get_logger(name)


def bind(**ids: object) -> None:
    """Bind ids (task, queue, assignment, provider) to every log line of this task."""
    structlog.contextvars.bind_contextvars(**{k: str(v) for k, v in ids.items() if v is not None})


def clear() -> None:
    structlog.contextvars.clear_contextvars()
