"""FairPool: batches share the threads item by item, results keep their order, errors
and closing reach the callers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.cache_server.storage.fair_pool import FairPool, PoolClosed


@pytest.fixture
def pool() -> Iterator[FairPool]:
    pool = FairPool(3, "test")
    yield pool
    pool.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers()))
def test_results_come_back_in_item_order(items: list[int]) -> None:
    pool = FairPool(3, "test")
    try:
        assert pool.map(lambda x: x * 2, items) == [x * 2 for x in items]
    finally:
        pool.close()


def test_every_item_runs_and_the_first_error_in_item_order_is_raised(pool: FairPool) -> None:
    ran: list[int] = []

    def fn(i: int) -> int:
        ran.append(i)
        if i in (3, 7):
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 3"):
        pool.map(fn, list(range(10)))
    assert sorted(ran) == list(range(10))


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_small_batch_is_not_held_behind_a_large_one() -> None:
    pool = FairPool(1, "test")
    order: list[str] = []
    gate = threading.Event()

    def large(i: int) -> None:
        if i == 0:
            gate.wait(10)
        order.append(f"L{i}")

    def small(i: int) -> None:
        order.append(f"S{i}")

    try:
        big = threading.Thread(target=pool.map, args=(large, list(range(20))))
        big.start()
        _wait_for(lambda: bool(pool._waiting) and pool._waiting[0].next == 1)
        little = threading.Thread(target=pool.map, args=(small, list(range(3))))
        little.start()
        _wait_for(lambda: len(pool._waiting) == 2)
        gate.set()
        little.join(10)
        big.join(10)
    finally:
        pool.close()
    # One thread: the large batch's first two items (it was queued again before the
    # small one came), then the two in turn. First come, first served would run S0 21st.
    assert order[:7] == ["L0", "L1", "S0", "L2", "S1", "L3", "S2"]
    assert sorted(order) == sorted([f"L{i}" for i in range(20)] + ["S0", "S1", "S2"])


def test_closing_fails_waiting_batches_and_later_calls() -> None:
    pool = FairPool(1, "test")
    gate = threading.Event()
    outcome: list[BaseException | list[int]] = []

    def call() -> None:
        try:
            outcome.append(pool.map(lambda i: gate.wait(10) and i, [0, 1, 2]))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    _wait_for(lambda: bool(pool._waiting) and pool._waiting[0].next == 1)
    pool.close()
    gate.set()
    caller.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], PoolClosed)
    with pytest.raises(PoolClosed):
        pool.map(lambda i: i, [1])
