"""``callq metrics``: Prometheus metrics read from the database at each scrape.

The figures come from PostgreSQL, so they are right whatever the number of workers:

    callq_queue_calls{status}                  live calls by queue status (gauge)
    callq_queue_due_calls                      queued calls already due (gauge)
    callq_oldest_due_call_age_seconds          how long the oldest due call has waited (gauge)
    callq_schedule_to_create_seconds           due -> provider accepted the create (histogram)
    callq_calls_ended_total{outcome,provider}  attempts ended, by outcome (counter)
    callq_calls_finished_total{status}         calls that reached completed/failed/canceled
    callq_provider_slots_in_use / _free{provider}
    callq_provider_circuit_open{provider}      1 while the circuit is open
    callq_provider_consecutive_failures{provider}
    callq_provider_up{provider}                1 when online, 0.5 degraded, 0 offline
    callq_tracking_overdue_calls               placed calls past their next poll (gauge)
    callq_tracking_lag_seconds                 how far the most overdue poll is behind (gauge)
    callq_workers_responding                   Celery workers answering a ping (gauge; only
                                               when a broker is configured)

Counters and the histogram are fed from ``call_events``: each scrape reads the events appended
since the last one, by id. Ids are taken when a row is inserted, not when its transaction
commits, so a scrape may see an event while one with a lower id is still uncommitted: every id
below the newest read that was not seen is a gap, looked for again at each scrape for
``GAP_SECONDS`` (a rolled-back insert leaves a gap forever; the newest ``MAX_GAPS`` are kept).
So an event is counted once, whatever the order its transaction commits in. Like any
counter, they start at zero with the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from models.session import connect

# How long an id below the newest read is looked for again (its transaction may commit later),
# and how many such ids are kept (the newest).
GAP_SECONDS = 600.0
MAX_GAPS = 10_000
EVENT_BATCH = 50_000
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
LIVE = ("queued", "claimed", "assigned", "dialing", "in_progress")
STATUS_VALUE = {"online": 1.0, "degraded": 0.5, "offline": 0.0}

QUEUE = """
SELECT status, count(*) FROM call_queue
 WHERE status IN ('queued', 'claimed', 'assigned', 'dialing', 'in_progress') GROUP BY status
"""
DUE = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(scheduled_time)), 0)
  FROM call_queue WHERE status = 'queued' AND scheduled_time <= now()
"""
PROVIDERS = """
SELECT p.name, l.current_calls, l.available_slots, pa.status, pa.consecutive_failures,
       (pa.circuit_open_until IS NOT NULL AND pa.circuit_open_until > now())
  FROM call_service_providers p JOIN provider_availability pa ON pa.provider_id = p.id
  JOIN provider_load l ON l.provider_id = p.id
 WHERE p.is_active
"""
TRACKING = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(next_poll_at)), 0)
  FROM call_assignments WHERE state = 'placed' AND next_poll_at < now()
"""
# Every kind is read (an id not returned is a gap); _count picks the kinds that feed a metric.
NEW_EVENTS = """
SELECT e.id, e.kind, e.outcome, coalesce(p.name, '-'),
       extract(epoch FROM e.created_at - e.due_at)
  FROM call_events e LEFT JOIN call_service_providers p ON p.id = e.provider_id
 WHERE e.id > %(after)s OR e.id = ANY(%(gaps)s::bigint[])
 ORDER BY e.id LIMIT %(limit)s
"""
LAST_EVENT = "SELECT coalesce(max(id), 0) FROM call_events"


class CallqCollector(Collector):
    """Reads the gauges at each scrape and feeds the event counters before they are read."""

    def __init__(
        self,
        url: str,
        *,
        pooled: bool | None = None,
        ping: Callable[[], int | None] | None = None,
    ) -> None:
        self._url, self._pooled, self._ping = url, pooled, ping
        self._lock = threading.Lock()
        self._after: int | None = None
        self._gaps: dict[int, float] = {}  # id -> when it was first missed (monotonic)
        self.registry = CollectorRegistry(auto_describe=False)
        # First: a scrape collects in registration order, and this collector feeds the
        # counters below before they are read.
        self.registry.register(self)
        self.ended = Counter(
            "callq_calls_ended",
            "Call attempts ended, by outcome and provider",
            ["outcome", "provider"],
            registry=self.registry,
        )
        self.finished = Counter(
            "callq_calls_finished",
            "Calls that reached a final status",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "callq_schedule_to_create_seconds",
            "Seconds from the time a call was due to the provider accepting its create",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def collect(self) -> Iterator[Metric]:
        with self._lock, connect(self._url, pooled=self._pooled, autocommit=True) as conn:
            self._feed(conn)
            yield from self._gauges(conn)
        if self._ping is not None:
            workers = self._ping()
            if workers is not None:
                yield _gauge("callq_workers_responding", "Celery workers answering a ping", workers)

    def _feed(self, conn: Any) -> None:
        if self._after is None:  # counters start with the process
            self._after = int(conn.execute(LAST_EVENT).fetchone()[0])
            return
        now = time.monotonic()
        self._gaps = {i: t for i, t in self._gaps.items() if now - t < GAP_SECONDS}
        while True:
            params = {"after": self._after, "gaps": list(self._gaps), "limit": EVENT_BATCH}
            rows = conn.execute(NEW_EVENTS, params).fetchall()
            newer: list[int] = []
            for event_id, kind, outcome, provider, latency in rows:
                event_id = int(event_id)
                if event_id > self._after:
                    newer.append(event_id)
                elif self._gaps.pop(event_id, None) is None:
                    continue  # not a gap: counted already
                self._count(kind, outcome, provider, latency)
            if newer:
                self._missed(self._after, newer, now)
                self._after = newer[-1]
            if len(rows) < EVENT_BATCH:
                return

    def _count(self, kind: str, outcome: str | None, provider: str, latency: Any) -> None:
        if kind == "ended":
            self.ended.labels(outcome or "-", provider).inc()
        elif kind == "placed" and latency is not None:
            self.latency.observe(max(float(latency), 0.0))
        elif kind in ("completed", "failed", "canceled"):
            self.finished.labels(kind).inc()

    def _missed(self, after: int, newer: list[int], now: float) -> None:
        """Record as gaps the ids above ``after`` and below the newest of ``newer`` (ids read,
        ascending) that were not read, the newest first, at most ``MAX_GAPS`` in all."""
        previous = after
        spans = []
        for event_id in newer:
            if event_id - previous > 1:
                spans.append((previous + 1, event_id))
            previous = event_id
        budget = MAX_GAPS
        for low, high in reversed(spans):
            for missing in range(high - 1, max(low, high - budget) - 1, -1):
                self._gaps[missing] = now
            budget -= high - low
            if budget <= 0:
                break
        if len(self._gaps) > MAX_GAPS:
            self._gaps = dict(sorted(self._gaps.items())[-MAX_GAPS:])

    def _gauges(self, conn: Any) -> Iterator[Metric]:
        counts = dict(conn.execute(QUEUE).fetchall())
        calls = GaugeMetricFamily(
            "callq_queue_calls", "Live calls by queue status", labels=["status"]
        )
        for status in LIVE:
            calls.add_metric([status], float(counts.get(status, 0)))
        yield calls
        due, oldest = conn.execute(DUE).fetchone()
        yield _gauge("callq_queue_due_calls", "Queued calls already due", due)
        yield _gauge(
            "callq_oldest_due_call_age_seconds", "Age of the oldest due queued call", oldest
        )
        families = {
            "in_use": ("callq_provider_slots_in_use", "Provider slots taken by live calls"),
            "free": ("callq_provider_slots_free", "Provider slots free"),
            "circuit": ("callq_provider_circuit_open", "1 while the provider's circuit is open"),
            "failures": ("callq_provider_consecutive_failures", "Failures in a row"),
            "up": ("callq_provider_up", "1 online, 0.5 degraded, 0 offline"),
        }
        fams = {k: GaugeMetricFamily(n, h, labels=["provider"]) for k, (n, h) in families.items()}
        for name, in_use, free, status, failures, circuit in conn.execute(PROVIDERS):
            fams["in_use"].add_metric([name], float(in_use))
            fams["free"].add_metric([name], float(free))
            fams["circuit"].add_metric([name], 1.0 if circuit else 0.0)
            fams["failures"].add_metric([name], float(failures))
            fams["up"].add_metric([name], STATUS_VALUE.get(status, 0.0))
        yield from fams.values()
        overdue, lag = conn.execute(TRACKING).fetchone()
        yield _gauge("callq_tracking_overdue_calls", "Placed calls past their next poll", overdue)
        yield _gauge("callq_tracking_lag_seconds", "How far the most overdue poll is behind", lag)


def _gauge(name: str, documentation: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value or 0))


def celery_ping(timeout: float = 2.0, every: float = 5.0) -> Callable[[], int | None]:
    """Workers answering a broadcast ping, refreshed by a background thread every ``every``
    seconds so that a scrape never waits on the broker (None until the first answer, and while
    the broker cannot be reached)."""
    latest: list[int | None] = [None]

    def loop() -> None:
        from worker.celery_app import app

        while True:
            try:
                latest[0] = len(app.control.ping(timeout=timeout) or [])
            except Exception:  # a broker outage must not end the metrics process
                latest[0] = None
            time.sleep(every)

    threading.Thread(target=loop, name="callq-metrics-ping", daemon=True).start()
    return lambda: latest[0]


def serve_metrics(
    url: str, host: str, port: int, *, pooled: bool | None = None, ping: bool = True
) -> WSGIServer:
    """A WSGI server exposing ``/metrics``; call ``serve_forever()`` on it."""
    from wsgiref.simple_server import make_server

    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

    collector = CallqCollector(url, pooled=pooled, ping=celery_ping() if ping else None)
    list(collector.collect())  # fail now, not at the first scrape, if the database is unusable
    app = make_wsgi_app(collector.registry)
    return make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
