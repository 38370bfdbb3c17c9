"""A lane's threads take its chunks' items best rank first (worker/runtime.py)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import runtime
from worker.embedded import wait_until


@contextlib.contextmanager
def lane_of_one_thread() -> Iterator[ThreadPoolExecutor]:
    """The dispatch lane with a single thread (and a queue of its own)."""
    pool = ThreadPoolExecutor(1)
    saved = runtime._executors.get("dispatch")
    runtime._executors["dispatch"] = pool
    runtime._ranked.pop("dispatch", None)
    yield pool
    pool.shutdown(wait=True)
    runtime._ranked.pop("dispatch", None)
    if saved is None:
        runtime._executors.pop("dispatch", None)
    else:
        runtime._executors["dispatch"] = saved


@pytest.fixture
def one_thread() -> Iterator[ThreadPoolExecutor]:
    with lane_of_one_thread() as pool:
        yield pool


def _waiting() -> int:
    return len(runtime._ranked_queue("dispatch")._heap)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(2, 7), min_size=1, max_size=5))
def test_items_run_best_rank_first_and_each_once(sizes: list[int]) -> None:
    """Chunks submitted while the lane's one thread is busy run in (place in chunk, arrival)
    order: a later chunk's first item goes before an earlier chunk's tail; every item runs once
    and each caller gets its own results in its own order."""
    with lane_of_one_thread() as pool:
        _check_order(pool, sizes)


def _check_order(pool: ThreadPoolExecutor, sizes: list[int]) -> None:
    release = threading.Event()
    pool.submit(release.wait)
    ran: list[tuple[int, int]] = []
    results: dict[int, list[tuple[int, int]]] = {}

    def caller(chunk: int, size: int) -> None:
        def fn(rank: int) -> tuple[int, int]:
            ran.append((chunk, rank))
            return (chunk, rank)

        results[chunk] = runtime.map_in_context(fn, range(size))

    threads = []
    for chunk, size in enumerate(sizes):
        before = _waiting()
        t = threading.Thread(target=caller, args=(chunk, size))
        t.start()
        threads.append(t)
        wait_until(lambda before=before, size=size: _waiting() == before + size, timeout=10)
    release.set()
    for t in threads:
        t.join(timeout=10)
    assert ran == sorted(ran, key=lambda cr: (cr[1], cr[0]))
    assert sorted(ran) == [(c, r) for c, size in enumerate(sizes) for r in range(size)]
    assert results == {c: [(c, r) for r in range(size)] for c, size in enumerate(sizes)}
    assert _waiting() == 0


def test_an_error_reaches_its_caller_and_the_lane_goes_on(one_thread: ThreadPoolExecutor) -> None:
    def fn(n: int) -> int:
        if n == 1:
            raise ValueError("boom")
        return n

    with pytest.raises(ValueError):
        runtime.map_in_context(fn, range(3))
    assert runtime.map_in_context(lambda n: n * 2, range(3)) == [0, 2, 4]


def test_a_pool_shut_down_leaves_no_item_behind(one_thread: ThreadPoolExecutor) -> None:
    """(process shutdown) The caller runs its items itself, each once."""
    one_thread.shutdown(wait=True)
    ran: list[int] = []

    def fn(n: int) -> int:
        ran.append(n)
        return n * 2

    assert runtime.map_in_context(fn, range(3)) == [0, 2, 4]
    assert sorted(ran) == [0, 1, 2]
    assert _waiting() == 0


def test_submit_counts_pending_work_until_it_ends() -> None:
    release = threading.Event()
    started = threading.Event()

    def job() -> str:
        started.set()
        release.wait(10)
        return "done"

    before = runtime.pending("listen")
    future = runtime.submit("listen", job)
    started.wait(10)
    assert runtime.pending("listen") == before + 1
    release.set()
    assert future.result(timeout=10) == "done"
    wait_until(lambda: runtime.pending("listen") == before, timeout=10)
