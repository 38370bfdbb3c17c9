"""call_templates' call features: a voicemail policy and a recording switch, checked."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

INSERT = (
    "INSERT INTO call_templates (name, script, voicemail_detection, voicemail_action,"
    " voicemail_message, record_calls) VALUES ('t', 's', %s, %s, %s, %s) RETURNING id"
)


@pytest.mark.parametrize(
    "values",
    [
        (None, "hang_up", None, None),
        (False, "hang_up", None, False),
        (True, "leave_message", "Please call us back.", True),
        (True, "hang_up", "kept but unused", None),
    ],
)
def test_valid_policies_are_stored(db_url: str, values: tuple[Any, ...]) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute(INSERT, values).fetchone() is not None


@pytest.mark.parametrize(
    "values",
    [
        (True, "leave_message", None, None),  # leaving a message needs its text
        (True, "leave_message", "   ", None),
        (True, "shout", None, None),
        (True, "leave_message", "x" * 1001, None),
    ],
)
def test_invalid_policies_are_refused(db_url: str, values: tuple[Any, ...]) -> None:
    with (
        psycopg.connect(db_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        conn.execute(INSERT, values)


def test_defaults_leave_the_providers_settings(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO call_templates (name, script) VALUES ('t', 's') RETURNING"
            " voicemail_detection, voicemail_action, voicemail_message, record_calls"
        ).fetchone()
    assert row == (None, "hang_up", None, None)
