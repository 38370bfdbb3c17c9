"""Celery's settings: a thin, lowercase view of :class:`worker.settings.Settings`.

:class:`SettingsConfig` is what the app is configured from. Celery reads a configuration source
when the app is first configured (the first ``app.conf`` access, or finalization), not when
``worker.celery_app`` is imported, so the settings are read then too: a test or a tool can build
its own settings first, and nothing is read from the working directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from kombu import Queue  # type: ignore[attr-defined]

from worker.settings import Settings, get_settings

# notify: signed call.ended events to the apps, on their own worker (callq worker -Q notify)
QUEUES = ("dispatch", "track", "maintenance", "notify")

TASK_ROUTES: dict[str, dict[str, Any]] = {
    "callq.poll": {"queue": "dispatch"},
    "callq.dispatch": {"queue": "dispatch"},
    "callq.dispatch_batch": {"queue": "dispatch"},
    "callq.track_due": {"queue": "track"},
    "callq.track_batch": {"queue": "track"},
    "callq.reconcile": {"queue": "track"},
    "callq.webhook": {"queue": "track"},
    "callq.health_check": {"queue": "maintenance"},
    "callq.reap": {"queue": "maintenance"},
    "callq.rollover": {"queue": "maintenance"},
    "callq.prune_events": {"queue": "maintenance"},
    "callq.noop": {"queue": "dispatch"},
    "callq.notify_drain": {"queue": "notify"},
    "callq.notify_deliver": {"queue": "notify"},
}
# Message priorities (Redis brokers serve 0 first; RabbitMQ ignores them, our queues have no
# x-max-priority): a poll goes before every waiting chunk, so a claim, which takes a newcomer's
# due calls first (fair share), is not held behind a backlog's dispatch and tracking messages.
# Everything else keeps its order among itself.
POLL_PRIORITY = 0
WORK_PRIORITY = 5
for _name, _route in TASK_ROUTES.items():
    _route["priority"] = POLL_PRIORITY if _name == "callq.poll" else WORK_PRIORITY


def celery_config(s: Settings) -> dict[str, Any]:
    """Every Celery setting callq uses, from one settings object."""
    return {
        "broker_url": s.broker_url or "redis://127.0.0.1:6379/0",
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": s.visibility_timeout_seconds},
        "broker_pool_limit": 32,
        # PostgreSQL is the only state; results are never read.
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # A task is acknowledged after it ran, and put back when its worker dies mid-way; the
        # SQL gates (mark_call_dialing, idempotent complete/fail) make a second delivery harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": s.worker_concurrency,
        "worker_pool": s.worker_pool,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": s.task_events,
        "task_send_sent_event": s.task_events,
        "task_default_queue": "dispatch",
        "task_queues": tuple(
            Queue(name, routing_key=name)  # type: ignore[no-untyped-call]
            for name in QUEUES
        ),
        "task_routes": TASK_ROUTES,
        "beat_schedule": beat_schedule(s),
        # The schedule lives here; beat's own schedule file only needs a private place. Beat
        # skips the ticks that would find nothing (worker/beat.py).
        "beat_scheduler": "worker.beat:Scheduler",
        "beat_schedule_filename": os.path.join(tempfile.gettempdir(), f"callq-beat-{os.getpid()}"),
        "include": ["worker.tasks"],
    }


def beat_schedule(s: Settings) -> dict[str, dict[str, Any]]:
    """Beat's periodic tasks and their intervals."""
    return {
        "poll-due-calls": {"task": "callq.poll", "schedule": s.poll_interval_seconds},
        "track-placed-calls": {"task": "callq.track_due", "schedule": s.track_tick_seconds},
        "provider-health": {"task": "callq.health_check", "schedule": s.health_interval_seconds},
        "reap-expired-leases": {"task": "callq.reap", "schedule": s.reaper_interval_seconds},
        "usage-rollover": {"task": "callq.rollover", "schedule": s.rollover_interval_seconds},
        "prune-call-events": {
            "task": "callq.prune_events",
            "schedule": s.event_prune_interval_seconds,
        },
        "notify-drain": {"task": "callq.notify_drain", "schedule": s.notify_interval_seconds},
    }


class SettingsConfig(Mapping[str, Any]):
    """A configuration source for ``app.config_from_object`` built on first read."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._built: dict[str, Any] | None = None

    def _config(self) -> dict[str, Any]:
        if self._built is None:
            self._built = celery_config(self._settings or get_settings())
        return self._built

    def __getitem__(self, key: str) -> Any:
        return self._config()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._config())

    def __len__(self) -> int:
        return len(self._config())
