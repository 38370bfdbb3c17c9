"""Celery's settings: a thin, lowercase view of :class:`worker.settings.Settings`."""

from __future__ import annotations

import os
import tempfile

from kombu import Queue

from worker.settings import get_settings

_s = get_settings()

broker_url = _s.broker_url or "redis://127.0.0.1:6379/0"
broker_connection_retry_on_startup = True
broker_transport_options = {"visibility_timeout": _s.visibility_timeout_seconds}
broker_pool_limit = 32

# PostgreSQL is the only state; results are never read.
task_ignore_result = True
result_backend = None

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# A task is acknowledged after it ran, and put back when its worker dies mid-way; the SQL gates
# (mark_call_dialing, idempotent complete/fail) make a second delivery harmless.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_concurrency = _s.worker_concurrency
worker_pool = _s.worker_pool
worker_hijack_root_logger = False
worker_send_task_events = _s.task_events
task_send_sent_event = _s.task_events

task_default_queue = "dispatch"
task_queues = (
    Queue("dispatch", routing_key="dispatch"),
    Queue("track", routing_key="track"),
    Queue("maintenance", routing_key="maintenance"),
    # notifications to the apps: their own worker (callq worker -Q notify)
    Queue("notify", routing_key="notify"),
)
task_routes = {
    "callq.poll": {"queue": "dispatch"},
    "callq.dispatch": {"queue": "dispatch"},
    "callq.dispatch_batch": {"queue": "dispatch"},
    "callq.track": {"queue": "track"},
    "callq.track_batch": {"queue": "track"},
    "callq.reconcile": {"queue": "track"},
    "callq.webhook": {"queue": "track"},
    "callq.health_check": {"queue": "maintenance"},
    "callq.reap": {"queue": "maintenance"},
    "callq.rollover": {"queue": "maintenance"},
    "callq.noop": {"queue": "dispatch"},
    "callq.notify_drain": {"queue": "notify"},
    "callq.notify_deliver": {"queue": "notify"},
}

beat_schedule = {
    "poll-due-calls": {"task": "callq.poll", "schedule": _s.poll_interval_seconds},
    "provider-health": {"task": "callq.health_check", "schedule": _s.health_interval_seconds},
    "reap-expired-leases": {"task": "callq.reap", "schedule": _s.reaper_interval_seconds},
    "usage-rollover": {"task": "callq.rollover", "schedule": _s.rollover_interval_seconds},
    "notify-drain": {"task": "callq.notify_drain", "schedule": _s.notify_interval_seconds},
}
# Beat's own schedule file is not needed: the schedule lives here.
beat_scheduler = "celery.beat:Scheduler"
beat_schedule_filename = os.path.join(tempfile.gettempdir(), f"callq-beat-{os.getpid()}")
