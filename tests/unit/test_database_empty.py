"""Named operations on nothing send nothing: an empty tick or chunk costs no round trip.

The database here is a port nobody listens on: any statement would fail to connect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from models.queries import Database
from worker.embedded import free_port

EMPTY: dict[str, Callable[[Database], Any]] = {
    "load_calls": lambda db: db.load_calls([]),
    "touch_polls": lambda db: db.touch_polls([]),
    "record_provider_states": lambda db: db.record_provider_states([]),
    "mark_placed": lambda db: db.mark_placed({}),
    "assignments_for_provider_calls": lambda db: db.assignments_for_provider_calls([]),
}


@pytest.mark.parametrize("operation", sorted(EMPTY))
def test_an_operation_on_nothing_sends_no_statement(operation: str) -> None:
    db = Database(f"postgresql://nobody@127.0.0.1:{free_port()}/nothing")
    try:
        assert not EMPTY[operation](db)
    finally:
        db.close()
