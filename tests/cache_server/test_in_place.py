"""Work the server does in place rather than per call or on a worker thread."""

from __future__ import annotations

import asyncio
import pathlib
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import zstandard

from slipstream.cache_server.calls import Call, CallWrapper, Hook
from slipstream.cache_server.services.capabilities import CapabilitiesService
from slipstream.cache_server.services.cas import CasService
from slipstream.cache_server.services.common import (
    IN_PLACE_GIL_FREE,
    SLOW_IN_PLACE_WRITE,
    WRITES_OFF_LOOP_SECONDS,
    Backend,
)
from slipstream.cache_server.storage.base import StoreUnavailable
from slipstream.cache_server.storage.disk import (
    IN_PLACE_FILES,
    RAM_FILESYSTEMS,
    DiskStore,
    filesystem_type,
)
from slipstream.cache_server.storage.memory import MemoryStore
from slipstream.cache_server.storage.shared_index import FIGURES, LOADING, Reporter, SharedIndex
from slipstream.core.digests import BlobId
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc


def _fail() -> None:
    raise KeyError("from the store")


def skip_on_a_ram_filesystem(path: pathlib.Path, what: str) -> None:
    """Skip, saying why, where the disk store works (or reads) in place anyway."""
    if filesystem_type(path) in RAM_FILESYSTEMS:
        print(f"SKIPPED: {path} is on a RAM filesystem, where the disk store {what} in place")
        pytest.skip(f"{path} is on a RAM filesystem")


def test_memory_store_calls_run_in_place_unless_they_hash_much() -> None:
    async def main() -> None:
        here = threading.get_ident()
        with ThreadPoolExecutor(2) as executor:
            memory = Backend(MemoryStore(), executor)
            assert await memory.run_store(threading.get_ident) == here
            at_limit = await memory.run_store(threading.get_ident, gil_free_bytes=IN_PLACE_GIL_FREE)
            assert at_limit == here
            assert await memory.run_store(threading.get_ident, entries=100_000) == here
            over = await memory.run_store(threading.get_ident, gil_free_bytes=IN_PLACE_GIL_FREE + 1)
            assert over != here
            with pytest.raises(KeyError, match="from the store"):
                await memory.run_store(_fail)

    asyncio.run(main())


def test_disk_store_calls_off_a_ram_filesystem_run_on_a_worker_thread(
    tmp_path: pathlib.Path,
) -> None:
    skip_on_a_ram_filesystem(tmp_path, "works")

    async def main() -> None:
        here = threading.get_ident()
        with ThreadPoolExecutor(2) as executor:
            disk = Backend(DiskStore(tmp_path / "store"), executor)
            assert await disk.run_store(threading.get_ident) != here  # files may block
            with pytest.raises(KeyError, match="from the store"):
                await disk.run_store(_fail)

    asyncio.run(main())


def test_disk_store_calls_on_tmpfs_run_in_place_unless_they_hash_much(
    tmpfs_path: pathlib.Path,
) -> None:
    async def main() -> None:
        here = threading.get_ident()
        with ThreadPoolExecutor(2) as executor:
            disk = Backend(DiskStore(tmpfs_path / "store"), executor)
            assert await disk.run_store(threading.get_ident) == here
            over = await disk.run_store(threading.get_ident, gil_free_bytes=IN_PLACE_GIL_FREE + 1)
            assert over != here
            # Each file costs syscalls: a call touching many goes to a worker thread.
            assert await disk.run_store(threading.get_ident, entries=IN_PLACE_FILES) == here
            assert await disk.run_store(threading.get_ident, entries=IN_PLACE_FILES + 1) != here

    asyncio.run(main())


def test_unsynced_disk_store_writes_run_in_place_once_its_index_is_loaded(
    tmp_path: pathlib.Path,
) -> None:
    """Without fsync the page cache takes small writes: a worker-thread trip (the GIL
    handed over around each syscall) cost more than the files. Reads may wait on the
    disk, and a synced write on the device: those stay on worker threads."""
    skip_on_a_ram_filesystem(tmp_path, "works")

    async def main() -> None:
        here = threading.get_ident()
        with ThreadPoolExecutor(2) as executor:
            unsynced = DiskStore(tmp_path / "unsynced", sync=False)
            disk = Backend(unsynced, executor)
            # While the index loads its merge holds the index's lock: not in place.
            assert not unsynced.index.loaded
            assert await disk.run_store(threading.get_ident, writes=True) != here
            loaded = threading.Event()
            unsynced.start_loading(loaded.set)
            assert loaded.wait(10)
            assert await disk.run_store(threading.get_ident, writes=True) == here
            assert await disk.run_store(threading.get_ident) != here  # a read may wait
            many = await disk.run_store(
                threading.get_ident, entries=IN_PLACE_FILES + 1, writes=True
            )
            assert many != here

            synced = DiskStore(tmp_path / "synced")
            synced_loaded = threading.Event()
            synced.start_loading(synced_loaded.set)
            assert synced_loaded.wait(10)
            assert (
                await Backend(synced, executor).run_store(threading.get_ident, writes=True) != here
            )

    asyncio.run(main())


def test_a_workers_unsynced_writes_run_in_place_while_the_supervisor_loads(
    tmp_path: pathlib.Path,
) -> None:
    """A worker's admissions are queued for its supervisor (Reporter.send never blocks):
    nothing its writes wait for, whether the supervisor's index is loaded or not."""
    skip_on_a_ram_filesystem(tmp_path, "works")
    root = tmp_path / "store"
    DiskStore(root)  # the layout, as the supervisor makes it
    ours, supervisor = socket.socketpair()
    figures = [0] * FIGURES
    figures[LOADING] = 1
    reporter = Reporter(ours, lambda: None)
    store = DiskStore(root, sync=False, index=SharedIndex(root, reporter, figures))

    async def main() -> tuple[int, int]:
        with ThreadPoolExecutor(1) as executor:
            backend = Backend(store, executor)
            loading = await backend.run_store(threading.get_ident, writes=True)
            figures[LOADING] = 0
            return loading, await backend.run_store(threading.get_ident, writes=True)

    try:
        assert asyncio.run(main()) == (threading.get_ident(),) * 2
        synced = DiskStore(root, index=SharedIndex(root, reporter, figures))
        assert not synced.writes_in_place
    finally:
        store.close()
        supervisor.close()


def test_batch_writes_to_an_unsynced_disk_store_run_in_place(tmp_path: pathlib.Path) -> None:
    skip_on_a_ram_filesystem(tmp_path, "works")
    data = [b"one", b"two"]
    request = re_pb2.BatchUpdateBlobsRequest(
        requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=BlobId.of(d).to_proto(), data=d)
            for d in data
        ]
    )
    put_on: list[int] = []

    class Noting(DiskStore):
        def put_blob(self, blob: BlobId, data: bytes) -> None:
            put_on.append(threading.get_ident())
            super().put_blob(blob, data)

    async def main() -> None:
        store = Noting(tmp_path / "store", sync=False)
        loaded = threading.Event()
        store.start_loading(loaded.set)
        assert loaded.wait(10)
        with ThreadPoolExecutor(1) as executor:
            cas = CasService(Backend(store, executor))
            response = await cas.BatchUpdateBlobs(request, None)  # type: ignore[arg-type]
        assert [r.status.code for r in response.responses] == [0, 0]
        assert [store.get_blob(BlobId.of(d)) for d in data] == data

    asyncio.run(main())
    assert put_on == [threading.get_ident()] * 2


class _ThreadNoting(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.put_on: list[int] = []

    def put_blob(self, blob: BlobId, data: bytes) -> None:
        self.put_on.append(threading.get_ident())
        super().put_blob(blob, data)


def test_a_small_zstd_batch_of_big_blobs_is_hashed_on_a_worker_thread() -> None:
    """What a batch costs to store is what its digests name, not its compressed bytes."""
    data = bytes(4 * IN_PLACE_GIL_FREE)
    packed = zstandard.ZstdCompressor().compress(data)
    assert len(packed) < IN_PLACE_GIL_FREE
    blob = BlobId.of(data)
    request = re_pb2.BatchUpdateBlobsRequest(
        requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(
                digest=blob.to_proto(), data=packed, compressor=re_pb2.Compressor.ZSTD
            )
        ]
    )

    async def main() -> int:
        store = _ThreadNoting()
        with ThreadPoolExecutor(1) as executor:
            cas = CasService(Backend(store, executor))
            response = await cas.BatchUpdateBlobs(request, None)  # type: ignore[arg-type]
        assert [r.status.code for r in response.responses] == [0]
        assert store.get_blob(blob) == data
        (thread,) = store.put_on
        return thread

    assert asyncio.run(main()) != threading.get_ident()


class _CountingWrapper(CallWrapper):
    def __init__(self, hooks: list[Hook]) -> None:
        super().__init__(hooks, ("/build.bazel.",))
        self.wraps = 0

    def wrap(self, handler: Any, method: str) -> Any:
        self.wraps += 1
        return super().wrap(handler, method)


class _Seen(Hook):
    def __init__(self) -> None:
        self.request_ids: list[str] = []

    def begin(self, call: Call) -> None:
        self.request_ids.append(call.request_id)


def test_handlers_are_wrapped_once_per_method_and_hooks_run_every_call() -> None:
    async def main() -> tuple[_CountingWrapper, _Seen]:
        seen = _Seen()
        wrapper = _CountingWrapper([seen])
        with ThreadPoolExecutor(1) as executor:
            server = grpc.aio.server(interceptors=[wrapper])
            backend = Backend(MemoryStore(), executor)
            re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(backend), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub: re_grpc.CapabilitiesAsyncStub = re_grpc.CapabilitiesStub(channel)  # type: ignore[assignment]
                    for _ in range(5):
                        await stub.GetCapabilities(re_pb2.GetCapabilitiesRequest())
            finally:
                await server.stop(None)
        return wrapper, seen

    wrapper, seen = asyncio.run(main())
    assert wrapper.wraps == 1
    assert len(seen.request_ids) == 5
    assert len(set(seen.request_ids)) == 5  # each call has its own id
    assert all(re.fullmatch(r"[0-9a-f]{16}", rid) for rid in seen.request_ids)


class _OneBlobUnreachable(MemoryStore):
    """A store whose backend cannot be asked about one blob (as S3 may fail one GET)."""

    def __init__(self, unreachable: BlobId) -> None:
        super().__init__()
        self.unreachable = unreachable

    def get_blob(self, blob: BlobId) -> bytes | None:
        if blob == self.unreachable:
            raise StoreUnavailable("bucket timed out")
        return super().get_blob(blob)


def test_one_unreachable_blob_fails_only_its_own_batch_read_entry() -> None:
    present, lost = b"present", b"unreachable"
    store = _OneBlobUnreachable(BlobId.of(lost))
    store.put_blob(BlobId.of(present), present)
    got = store.get_blobs([BlobId.of(present), BlobId.of(lost)])
    assert got[0] == present and isinstance(got[1], StoreUnavailable)

    encoded = CasService(Backend(store, None))._read_batch(  # type: ignore[arg-type]
        [BlobId.of(present), BlobId.of(lost), BlobId.of(b"absent")], zstd=False
    )
    entries = re_pb2.BatchReadBlobsResponse.FromString(encoded.message).responses
    assert [e.status.code for e in entries] == [
        grpc.StatusCode.OK.value[0],
        grpc.StatusCode.UNAVAILABLE.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
    ]
    assert entries[0].data == present and "timed out" in entries[1].status.message
    assert (encoded.found, encoded.not_found) == (1, 2)


class _CountingExecutor(ThreadPoolExecutor):
    """A worker pool that counts the work handed to it."""

    def __init__(self) -> None:
        super().__init__(2)
        self.trips = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.trips += 1
        return super().submit(fn, *args, **kwargs)


def test_a_read_of_a_blob_of_one_chunk_takes_one_worker_thread_trip(
    tmp_path: pathlib.Path,
) -> None:
    """open_read hands the store's read and its first chunk to one worker-thread trip:
    a ByteStream read of a blob within a chunk (a 1 MiB output) costs one trip, not
    two; a bigger blob one more per further chunk."""
    skip_on_a_ram_filesystem(tmp_path, "reads")
    chunk = 1 << 20
    small, big = b"s" * chunk, bytes(range(256)) * (chunk * 5 // 2 // 256)

    async def main() -> None:
        with _CountingExecutor() as executor:
            store = DiskStore(tmp_path / "store")
            disk = Backend(store, executor)
            for data in (small, big):
                store.put_blob(BlobId.of(data), data)
            executor.trips = 0
            opened = await disk.open_read(BlobId.of(small), 0, chunk)
            assert opened is not None and opened[0] == small and executor.trips == 1
            assert await disk.open_read(BlobId.of(b"absent"), 0, chunk) is None
            executor.trips = 0
            opened = await disk.open_read(BlobId.of(big), 5, chunk)
            assert opened is not None
            first, rest = opened
            got = [first]
            while (more := await disk.next_chunk(rest)) is not None:
                got.append(more)
            assert b"".join(c for c in got if c is not None) == big[5:]
            assert executor.trips == 4  # open and first chunk, two more, the end

    asyncio.run(main())


def test_a_write_that_stalls_the_event_loop_sends_writes_to_worker_threads_for_a_while(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk that stalls a write made in place (writeback throttled, a full journal)
    holds up the process's other calls once, not on every write: the writes after it
    go to worker threads for WRITES_OFF_LOOP_SECONDS, then come back in place."""
    skip_on_a_ram_filesystem(tmp_path, "works")

    def stalled_write() -> int:
        time.sleep(SLOW_IN_PLACE_WRITE * 1.5)
        return threading.get_ident()

    async def main() -> None:
        here = threading.get_ident()
        with ThreadPoolExecutor(2) as executor:
            store = DiskStore(tmp_path / "unsynced", sync=False)
            loaded = threading.Event()
            store.start_loading(loaded.set)
            assert loaded.wait(10)
            disk = Backend(store, executor)
            assert await disk.run_store(stalled_write, writes=True) == here
            assert await disk.run_store(threading.get_ident, writes=True) != here
            assert disk.writes_off_loop_until > time.monotonic() + WRITES_OFF_LOOP_SECONDS - 5
            disk.writes_off_loop_until = time.monotonic()  # the pause over
            assert await disk.run_store(threading.get_ident, writes=True) == here

    asyncio.run(main())
    assert "a write held the event loop" in caplog.text
