"""The rows the worker reads, as typed values built once where they are read.

``ProviderRow`` is one ``call_service_providers`` row; ``CallRow`` is what a dispatch, a poll or
a reconcile needs about one assignment (its queue row, template and provider). Keys, phone
numbers, names and scripts are kept out of every ``repr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID


class AssignmentState(StrEnum):
    """``call_assignments.state``; the first three are live (they hold a provider slot)."""

    ASSIGNED = "assigned"
    DIALING = "dialing"
    PLACED = "placed"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    RELEASED = "released"

    @property
    def is_live(self) -> bool:
        """True while the assignment holds a provider slot."""
        return self in LIVE_ASSIGNMENT_STATES


LIVE_ASSIGNMENT_STATES = frozenset(
    {AssignmentState.ASSIGNED, AssignmentState.DIALING, AssignmentState.PLACED}
)


@dataclass(frozen=True, slots=True)
class ProviderRow:
    """One provider account as the worker loads it (credentials may be ``env:NAME``)."""

    provider_id: UUID
    name: str
    provider_type: str
    api_key: str | None = field(default=None, repr=False)
    api_secret: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    base_url: str | None = None
    max_concurrent_calls: int | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ProviderRow:
        """Build from a row with the columns of ``models.queries.PROVIDER_COLUMNS``."""
        return cls(
            provider_id=row["provider_id"],
            name=row["provider_name"],
            provider_type=row["provider_type"],
            api_key=row["api_key"],
            api_secret=row["api_secret"],
            webhook_secret=row.get("webhook_secret"),
            base_url=row["base_url"],
            max_concurrent_calls=row["max_concurrent_calls"],
            capabilities=dict(row["capabilities"] or {}),
            config=dict(row["config"] or {}),
        )


@dataclass(frozen=True, slots=True)
class CallRow:
    """One assignment with its queue row, template and provider, read in one statement."""

    assignment_id: UUID
    state: AssignmentState
    attempt: int
    poll_count: int
    provider_call_id: str | None
    dialing_at: datetime | None
    queue_id: UUID
    queue_status: str
    recipient_phone: str = field(repr=False)
    recipient_name: str | None = field(repr=False)
    recipient_email: str | None = field(repr=False)
    custom_variables: dict[str, Any] = field(repr=False)
    template_name: str | None
    script: str | None = field(repr=False)
    first_message: str | None = field(repr=False)
    provider: ProviderRow
    # What the template asks of the provider (None: the provider's own setting).
    voicemail_detection: bool | None = None
    voicemail_action: str | None = None
    voicemail_message: str | None = field(default=None, repr=False)
    record_calls: bool | None = None
    # Limits and caller id filled at dial time (None when not set).
    max_duration_seconds: float | None = None
    caller_id: str | None = field(default=None, repr=False)
    # The provider's creates are paced fleet-wide (reserve_provider_create before sending).
    paced: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CallRow:
        """Build from a row of ``models.queries.LOAD_CALL``."""
        return cls(
            assignment_id=row["assignment_id"],
            state=AssignmentState(row["state"]),
            attempt=row["attempt"],
            poll_count=row["poll_count"],
            provider_call_id=row["provider_call_id"],
            dialing_at=row["dialing_at"],
            queue_id=row["queue_id"],
            queue_status=row["queue_status"],
            recipient_phone=row["recipient_phone"],
            recipient_name=row["recipient_name"],
            recipient_email=row["recipient_email"],
            custom_variables=dict(row["custom_variables"] or {}),
            template_name=row["template_name"],
            script=row["script"],
            first_message=row["first_message"],
            provider=ProviderRow.from_row(row),
            voicemail_detection=row.get("voicemail_detection"),
            voicemail_action=row.get("voicemail_action"),
            voicemail_message=row.get("voicemail_message"),
            record_calls=row.get("record_calls"),
            max_duration_seconds=row.get("max_duration_seconds"),
            caller_id=row.get("caller_id"),
            paced=bool(row.get("paced")),
        )
