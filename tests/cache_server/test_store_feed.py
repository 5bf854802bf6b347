"""How a ByteStream upload's data reaches its store writer: in order, on a worker
thread, with the event loop running ahead by at most FEED_AHEAD bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from slipstream.cache_server.services.bytestream import FEED_AHEAD, _StoreFeed
from slipstream.cache_server.services.common import Backend
from slipstream.cache_server.storage.base import BlobWriter, Chunk
from slipstream.cache_server.storage.memory import MemoryStore
from slipstream.core.digests import BlobId

MIB = 1 << 20


class _GatedWriter(BlobWriter):
    """Takes each write only once its gate is open; fails the write numbered fail_at."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__(BlobId("0" * 64, 1 << 40))
        self.gate = threading.Event()
        self.started = threading.Event()
        self.fail_at = fail_at
        self.taken: list[bytes] = []
        self.threads: set[int] = set()

    def write(self, data: Chunk) -> None:
        self.started.set()
        self.gate.wait(30)
        self.threads.add(threading.get_ident())
        if len(self.taken) == self.fail_at:
            raise OSError("disk on fire")
        self.taken.append(bytes(data))

    def commit(self) -> None:
        raise AssertionError("not used")

    def abort(self) -> None:
        pass


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def _chunks(count: int) -> list[bytes]:
    return [bytes([i]) * MIB for i in range(count)]


def test_the_loop_runs_ahead_of_the_writer_until_the_limit(executor: ThreadPoolExecutor) -> None:
    ahead = FEED_AHEAD // MIB

    async def main() -> None:
        writer = _GatedWriter()
        feed = _StoreFeed(Backend(MemoryStore(), executor), writer)
        for chunk in _chunks(ahead):
            await feed.put(chunk)  # none of them written yet: the gate is shut
        assert writer.taken == []
        over = asyncio.ensure_future(feed.put(b"x" * MIB))
        await asyncio.sleep(0.2)
        assert not over.done(), "put past FEED_AHEAD must wait for the writer"
        writer.gate.set()
        await over
        await feed.put(b"y")
        await feed.finish()
        assert writer.taken == [*_chunks(ahead), b"x" * MIB, b"y"]
        assert threading.get_ident() not in writer.threads

    asyncio.run(main())


def test_a_failed_write_is_raised_and_nothing_after_it_is_written(
    executor: ThreadPoolExecutor,
) -> None:
    async def main() -> None:
        writer = _GatedWriter(fail_at=1)
        writer.gate.set()
        feed = _StoreFeed(Backend(MemoryStore(), executor), writer)
        with pytest.raises(OSError, match="disk on fire"):
            for chunk in _chunks(20):
                await feed.put(chunk)
            await feed.finish()
        assert writer.taken == _chunks(1)
        with pytest.raises(OSError, match="disk on fire"):
            await feed.put(b"more")  # a failed feed stays failed
        await feed.discard()  # the error is moot on the way out
        assert writer.taken == _chunks(1)

    asyncio.run(main())


def test_a_write_failing_while_the_loop_waits_for_room_wakes_it(
    executor: ThreadPoolExecutor,
) -> None:
    async def main() -> None:
        writer = _GatedWriter(fail_at=0)
        feed = _StoreFeed(Backend(MemoryStore(), executor), writer)
        for chunk in _chunks(FEED_AHEAD // MIB):
            await feed.put(chunk)
        over = asyncio.ensure_future(feed.put(b"x" * MIB))
        await asyncio.sleep(0.05)
        writer.gate.set()
        with pytest.raises(OSError, match="disk on fire"):
            await asyncio.wait_for(over, 10)
        assert writer.taken == []

    asyncio.run(main())


def test_discard_drops_what_is_queued_and_waits_for_the_write_under_way(
    executor: ThreadPoolExecutor,
) -> None:
    async def main() -> None:
        writer = _GatedWriter()
        feed = _StoreFeed(Backend(MemoryStore(), executor), writer)
        for chunk in _chunks(3):
            await feed.put(chunk)
        await asyncio.to_thread(writer.started.wait, 10)
        discarding = asyncio.ensure_future(feed.discard())
        await asyncio.sleep(0.05)
        assert not discarding.done(), "discard must wait for the write under way"
        writer.gate.set()
        await discarding
        assert writer.taken == _chunks(1)

    asyncio.run(main())


def test_memory_store_keeps_views_of_bytes_but_copies_views_of_mutable_buffers() -> None:
    store = MemoryStore()
    kept = os.urandom(3 * MIB)
    mutable = bytearray(os.urandom(MIB))
    for pieces in ([memoryview(kept)[:MIB], memoryview(kept)[MIB:]], [memoryview(mutable)]):
        data = b"".join(pieces)
        blob = BlobId(hashlib.sha256(data).hexdigest(), len(data))
        writer = store.open_writer(blob)
        for piece in pieces:
            writer.write(piece)
        writer.commit()
        mutable[0] ^= 0xFF  # after the commit: the stored blob must not change
        chunks = store.read_blob(blob, MIB // 2, MIB)
        assert chunks is not None
        assert b"".join(chunks) == data[MIB // 2 :]
        assert store.get_blob(blob) == data
