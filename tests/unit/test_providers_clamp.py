"""Provider data is checked at the adapter boundary: whatever a provider (or a forger of its
replies) sends, the ``CallStatus`` that crosses the port holds only values the database takes."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from providers import retell, synthflow, vapi
from providers.base import (
    MAX_CALL_COST,
    MAX_CALL_SECONDS,
    CallState,
    CallStatus,
    clamp_status,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

numbers = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([-1.0, 0.0, 59.9, 3600.0, 1e308, -0.0]),
)
times = st.one_of(
    st.none(),
    st.datetimes(timezones=st.sampled_from([UTC, None])),
    st.datetimes(
        min_value=datetime(2026, 11, 29), max_value=datetime(2026, 12, 1), timezones=st.just(UTC)
    ),
)
texts = st.one_of(st.none(), st.text(max_size=50), st.just("a\x00b"))


def assert_sane(status: CallStatus) -> None:
    d, c = status.duration_seconds, status.cost
    assert d is None or (math.isfinite(d) and 0 <= d <= MAX_CALL_SECONDS)
    assert c is None or (math.isfinite(c) and 0 <= c <= MAX_CALL_COST)
    if status.started_at is None:
        assert status.ended_at is None
    if status.started_at is not None and status.ended_at is not None:
        assert status.ended_at >= status.started_at
        assert status.started_at.tzinfo is not None and status.ended_at.tzinfo is not None
    if status.state.is_terminal and status.started_at is not None:
        assert status.ended_at is not None
    for text in (status.transcript, status.recording_url, status.ended_reason):
        assert text is None or "\x00" not in text


@given(
    state=st.sampled_from(list(CallState)),
    started=times,
    ended=times,
    duration=numbers,
    cost=numbers,
    transcript=texts,
    reason=texts,
)
def test_clamped_status_is_always_sane_and_clamping_is_idempotent(
    state: CallState,
    started: datetime | None,
    ended: datetime | None,
    duration: Any,
    cost: Any,
    transcript: str | None,
    reason: str | None,
) -> None:
    raw = CallStatus(
        "c1", state, ended_reason=reason, started_at=started, ended_at=ended,
        duration_seconds=duration, cost=cost, transcript=transcript,
    )  # fmt: skip
    clamped = clamp_status(raw, now=NOW)
    assert_sane(clamped)
    assert clamp_status(clamped, now=NOW) == clamped


def test_the_cases_the_review_found() -> None:
    start = NOW - timedelta(minutes=5)
    backwards = clamp_status(
        CallStatus("c", CallState.COMPLETED, started_at=start, ended_at=start - timedelta(hours=1),
                   duration_seconds=-3600.0, cost=-1.0),
        now=NOW,
    )  # fmt: skip
    assert backwards.ended_at == start and backwards.duration_seconds == 0.0
    assert backwards.cost is None
    absurd = clamp_status(
        CallStatus("c", CallState.COMPLETED, started_at=start, duration_seconds=1e12, cost=1e12),
        now=NOW,
    )
    assert absurd.duration_seconds == 0.0 and absurd.cost is None
    good = clamp_status(
        CallStatus("c", CallState.COMPLETED, started_at=start, duration_seconds=61.5, cost=0.12),
        now=NOW,
    )
    assert good.ended_at == start + timedelta(seconds=61.5) and good.cost == 0.12


json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
        st.sampled_from(["2026-11-30T11:59:00Z", "1e400", "-5", "99999999999999999999", "\x00"]),
    ),
    lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=8), k, max_size=3),
    max_leaves=8,
)  # fmt: skip
VAPI_KEYS = ["id", "status", "endedReason", "startedAt", "endedAt", "cost", "artifact",
             "transcript", "recordingUrl", "customer", "assistantOverrides"]  # fmt: skip
SYNTHFLOW_KEYS = ["call_id", "status", "call_status", "end_call_reason", "error_message",
                  "start_time", "duration", "transcript", "recording_url",
                  "prompt_variables"]  # fmt: skip


@settings(max_examples=300)
@given(
    data=st.dictionaries(st.sampled_from(VAPI_KEYS), json_values, max_size=11),
    call_id=st.one_of(st.just("call-1"), json_values),
    status=st.sampled_from(["ended", "in-progress", None, "weird"]),
)
def test_vapi_parse_never_crashes_and_is_sane(
    data: dict[str, Any], call_id: Any, status: str | None
) -> None:
    item = {**data, "id": call_id, "status": status}
    try:
        parsed = vapi.parse_call(item)
    except ValueError:
        return  # no usable id: the adapter reports a provider error
    assert_sane(parsed)


@settings(max_examples=300)
@given(
    data=st.dictionaries(st.sampled_from(SYNTHFLOW_KEYS), json_values, max_size=10),
    call_id=st.one_of(st.just("sf-1"), json_values),
    status=st.sampled_from(["completed", "failed", "in-progress", None]),
)
def test_synthflow_parse_never_crashes_and_is_sane(
    data: dict[str, Any], call_id: Any, status: str | None
) -> None:
    item = {**data, "call_id": call_id, "status": status}
    try:
        parsed = synthflow.parse_call(item)
    except ValueError:
        return
    assert_sane(parsed)


RETELL_KEYS = ["call_status", "disconnection_reason", "start_timestamp", "end_timestamp",
               "duration_ms", "call_cost", "transcript", "recording_url", "call_analysis",
               "metadata"]  # fmt: skip


@settings(max_examples=300)
@given(
    data=st.dictionaries(st.sampled_from(RETELL_KEYS), json_values, max_size=10),
    call_id=st.one_of(st.just("rt-1"), json_values),
    status=st.sampled_from(["ended", "ongoing", "error", None]),
)
def test_retell_parse_never_crashes_and_is_sane(
    data: dict[str, Any], call_id: Any, status: str | None
) -> None:
    item = {**data, "call_id": call_id, "call_status": status}
    try:
        parsed = retell.parse_call(item)
    except ValueError:
        return
    assert_sane(parsed)
