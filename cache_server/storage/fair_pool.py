"""Worker threads shared by concurrent batches, which take turns.

A store with slow round trips (S3) runs each batch call's requests in parallel on a
fixed set of threads. With a first-come queue, a FindMissingBlobs of 1,000 digests
queues 1,000 requests, and a BatchReadBlobs of ten that arrives just after waits for all
of them. Here the threads take the next item from each waiting batch in turn, so a small
batch finishes after about as many rounds as it has items, whatever else is queued.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

X = TypeVar("X")
Y = TypeVar("Y")


class PoolClosed(RuntimeError):
    """The pool was closed before a batch's items had all run."""


class _Batch(Generic[X, Y]):
    def __init__(self, fn: Callable[[X], Y], items: Sequence[X]) -> None:
        self.fn = fn
        self.items = items
        self.next = 0  # the next item to hand out; guarded by the pool's lock
        self.results: list[Y | None] = [None] * len(items)
        self.errors: dict[int, BaseException] = {}
        self.left = len(items)  # items not finished; guarded by the pool's lock
        self.done = threading.Event()


class FairPool:
    """`workers` threads running the items of every `map` call, taking one item from
    each waiting batch in turn (round robin) rather than whole batches in arrival order."""

    def __init__(self, workers: int, name: str) -> None:
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Batch[object, object]] = collections.deque()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def map(self, fn: Callable[[X], Y], items: Sequence[X]) -> list[Y]:
        """fn of each item, in order, run on the pool's threads. Every item runs; if any
        raised, the first one's exception (in item order) is raised once all are done."""
        if not items:
            return []
        batch: _Batch[X, Y] = _Batch(fn, items)
        with self._lock:
            if self._closed:
                raise PoolClosed("the pool is closed")
            self._waiting.append(batch)  # type: ignore[arg-type]
            self._lock.notify(len(items))
        batch.done.wait()
        if batch.errors:
            raise batch.errors[min(batch.errors)]
        return batch.results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the threads after the items they are running; batches still waiting
        fail with PoolClosed for the items not yet started."""
        with self._lock:
            self._closed = True
            while self._waiting:
                batch = self._waiting.popleft()
                for i in range(batch.next, len(batch.items)):
                    batch.errors[i] = PoolClosed("the pool was closed")
                batch.left -= len(batch.items) - batch.next
                batch.next = len(batch.items)
                if batch.left == 0:
                    batch.done.set()
            self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return
                batch = self._waiting.popleft()
                i = batch.next
                batch.next += 1
                if batch.next < len(batch.items):
                    self._waiting.append(batch)  # to the back: the other batches go first
            try:
                batch.results[i] = batch.fn(batch.items[i])
            except BaseException as exc:  # handed to the caller of map
                batch.errors[i] = exc
            with self._lock:
                batch.left -= 1
                if batch.left == 0:
                    batch.done.set()
