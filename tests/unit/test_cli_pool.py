"""``callq worker -P x``: the pool asked for on the command line reaches Celery.

Celery reads ``-P prefork`` (its own default) as "no pool asked for" and uses the configured
``worker_pool``, which callq sets from ``CALLQ_WORKER_POOL`` (threads): without the CLI carrying
the flag over into the setting, ``callq worker -P prefork`` silently ran threads."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import cli
from worker.cli import requested_pool

POOLS = st.sampled_from(["prefork", "threads", "solo", "eventlet", "gevent"])
OTHER = st.lists(st.sampled_from(["-Q", "dispatch", "-c", "4", "--loglevel", "INFO", "-n", "w@h"]))


def _spelled(flag: str, pool: str) -> list[str]:
    return {
        "-P": ["-P", pool],
        "-Px": [f"-P{pool}"],
        "--pool": ["--pool", pool],
        "--pool=": [f"--pool={pool}"],
    }[flag]


@given(
    before=OTHER,
    after=OTHER,
    asked=st.lists(st.tuples(st.sampled_from(["-P", "-Px", "--pool", "--pool="]), POOLS)),
)
def test_the_last_pool_asked_for_is_found_in_any_spelling(
    before: list[str], after: list[str], asked: list[tuple[str, str]]
) -> None:
    args = list(before)
    for flag, pool in asked:
        args += _spelled(flag, pool)
    args += after
    assert requested_pool(args) == (asked[-1][1] if asked else None)


def test_the_worker_command_carries_the_pool_into_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "require_database", lambda *a, **k: "postgresql://x")
    monkeypatch.setattr(cli, "supervise", lambda argv: seen.append(argv) or 0)
    monkeypatch.delenv("CALLQ_WORKER_POOL", raising=False)
    assert cli._celery("worker", ["-P", "prefork", "-c", "2"]) == 0
    assert seen and seen[0][-4:] == ["-P", "prefork", "-c", "2"]
    assert os.environ["CALLQ_WORKER_POOL"] == "prefork"
