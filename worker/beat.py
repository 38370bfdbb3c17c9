"""Beat's scheduler: a tick whose work waits in PostgreSQL is sent only when some does.

Three of beat's ticks start by taking due rows: ``callq.poll`` (due calls), ``callq.track_due``
(placed calls whose poll is due) and ``callq.notify_drain`` (notifications whose attempt is
due). Sent every second or two to a fleet with nothing to do, each is a broker message a worker
receives, runs and acknowledges: about 2.5 ms of the worker's CPU for the message, several
times the empty tick's own statement (bench/FINDINGS.md 21). Before sending one, beat asks
PostgreSQL whether its work is there (``due_work()``: three index probes, read-only, one
statement for the ticks that fall due together) and skips the tick when it is not.

The question covers everything the task could take (the task still decides what it takes), so
a skipped tick is one that would have found nothing. When the question fails (the database
unreachable, say), the tick is sent as before: its task meets the same error and says so.
Every other tick (health, reaper, rollover, pruning) is sent on its schedule.

While the leading worker tracks in its own process (worker/listener.py, it holds
``TRACKER_KEY``), the tracking tick's question wakes it with a NOTIFY when a poll is due, and
the tick's own message goes out only for a poll overdue by ``CALLQ_TRACK_FALLBACK_SECONDS``.
"""

from __future__ import annotations

import time
from typing import Any

from celery import beat

from worker import logs, runtime
from worker.listener import TRACKER_KEY
from worker.settings import get_settings

log = logs.get_logger("callq.beat")

# The ticks beat sends only when work waits, and the due_work() answer that says so.
WORK_OF: dict[str, str] = {
    "callq.poll": "calls",
    "callq.track_due": "polls",
    "callq.notify_drain": "notifications",
}
# Ticks falling due within this long of an answer share it (one statement for them).
ANSWER_SECONDS = 0.2


class Scheduler(beat.Scheduler):  # type: ignore[misc]
    """Celery's scheduler, skipping the ticks of :data:`WORK_OF` that would find nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._answer: tuple[float, dict[str, bool]] | None = None
        self._failing = False
        super().__init__(*args, **kwargs)

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        # Beat's tick sends through here (Celery logs "Sending due task" before apply_async:
        # a skipped tick is not logged so).
        work = WORK_OF.get(entry.task)
        if work is not None and not self.work_waits(work):
            return
        super().apply_entry(entry, producer)

    def work_waits(self, work: str) -> bool:
        """Whether ``work`` (a key of ``due_work()``) waits; True when that cannot be told.
        The tracking tick always asks anew, and its question wakes the leading worker's
        tracker when a poll is due (which then answers False until one is overdue by the
        fallback)."""
        now = time.monotonic()
        wake = work == "polls"
        if wake or self._answer is None or now - self._answer[0] > ANSWER_SECONDS:
            try:
                fallback = get_settings().track_fallback_seconds
                answer = runtime.database().due_work(TRACKER_KEY, fallback, wake_tracker=wake)
                self._answer = (now, answer)
            except Exception as exc:  # the tick goes out and its task meets the error
                if not self._failing:
                    log.warning("beat.due_work_failed", error=type(exc).__name__)
                self._failing = True
                self._answer = None
                return True
            if self._failing:
                log.info("beat.due_work_answers")
            self._failing = False
        return self._answer[1].get(work, True)
