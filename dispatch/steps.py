"""What one step of a call's life did, as a small value the batch tasks collect.

A dispatch, a poll or a reconcile returns one of these; the task that ran it sends what
follows (a ``reconcile`` per unknown outcome; a poll needs no message, its time is a column)
and counts the labels for its result.

    Placed(first_poll)          the provider accepted the call
    Polling(next_poll)          the call goes on: poll again with this token after this delay
    Reconciling(lookup, delay)  the create's outcome is unknown: look the call up again
    Ended(outcome)              complete_call or handle_failed_call ran: what it did
    Skipped(reason)             nothing to do (another task got there first, a stale chain...)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """What ending a call did: ``complete_call`` or ``handle_failed_call``'s answer."""

    COMPLETED = "completed"
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"
    CANCELED = "canceled"
    NOOP = "noop"  # the assignment had already ended: a duplicate changed nothing
    RELEASED = "released"  # nothing was sent: back to the queue, no attempt used


class SkipReason(StrEnum):
    """Why a step did nothing."""

    GATE_CLOSED = "gate_closed"  # another delivery won mark_call_dialing, or it was released
    NOT_PLACED = "not_placed"  # a poll for a call that already ended (or is not placed yet)
    NOT_DIALING = "not_dialing"  # a reconcile for a call that is no longer dialing
    SUPERSEDED = "superseded"  # a newer tracking chain holds the poll token
    CHECKED = "checked"  # a one-off check (webhook) found the call still going
    UNKNOWN_CALL = "unknown_call"  # a webhook for a provider call id we never placed
    RATE_DEFERRED = "rate_deferred"  # no fleet-wide create slot in time: back in the queue


@dataclass(frozen=True, slots=True)
class NextPoll:
    """A placed call to poll: its assignment, the poll token it holds, seconds from now."""

    assignment_id: str
    token: int
    delay: float


@dataclass(frozen=True, slots=True)
class Placed:
    """The provider accepted the call (or a reconcile found it): its first poll."""

    first_poll: NextPoll

    @property
    def label(self) -> str:
        return "placed"


@dataclass(frozen=True, slots=True)
class Polling:
    """The call has not ended: poll it again."""

    next_poll: NextPoll

    @property
    def label(self) -> str:
        return "polling"


@dataclass(frozen=True, slots=True)
class Reconciling:
    """The create may have reached the provider: look it up (lookup number ``lookup``) later."""

    assignment_id: str
    lookup: int
    delay: float

    @property
    def label(self) -> str:
        return "reconciling"


@dataclass(frozen=True, slots=True)
class Ended:
    """The call was completed or failed."""

    outcome: Outcome

    @property
    def label(self) -> str:
        return str(self.outcome)


@dataclass(frozen=True, slots=True)
class Skipped:
    """Nothing to do."""

    reason: SkipReason

    @property
    def label(self) -> str:
        return str(self.reason)


Step = Placed | Polling | Reconciling | Ended | Skipped


def tally(steps: Iterable[Step]) -> dict[str, int]:
    """How many steps ended with each label (a batch task's result)."""
    return dict(Counter(step.label for step in steps))
