"""ByteStream: streamed reads and resumable, verified writes of large blobs."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from slipstream.cache_server.calls import HOLD_STREAM, current_call
from slipstream.cache_server.resource_names import ResourceName, parse_read_name, parse_write_name
from slipstream.cache_server.services.common import (
    Backend,
    RpcError,
    add_servicer,
    encoded,
    grpc_errors,
    instance_ok,
)
from slipstream.cache_server.storage.base import BlobWriter, Chunk
from slipstream.cache_server.wire import WriteChunk, encode_read_response, parse_write_request
from slipstream.core.compression import StreamDecompressor, compress_stream
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import bytestream_pb2_grpc as bs_grpc

READ_CHUNK = 1024 * 1024
# Small client chunks are gathered up to this size before they go to the store.
WRITE_BUFFER = 1024 * 1024
# How far the received data may run ahead of the store writer's thread.
FEED_AHEAD = 4 * 1024 * 1024
# An upload that receives nothing this long is dropped, whether its call is still
# open or it was left for a resume (--upload-idle-timeout).
UPLOAD_IDLE_TIMEOUT = 60.0
REMEMBER_COMPLETED = 10_000


def add_to_server(service: ByteStreamService, server: grpc.aio.Server) -> None:
    """Register ByteStream with its data-carrying messages on the wire through
    cache_server.wire: Read yields ReadResponses already encoded, and a Write
    request's data arrives as a view into the received message, not as two copies."""
    add_servicer(
        server,
        service,
        bs_pb2.DESCRIPTOR.services_by_name["ByteStream"],
        decoders={"Write": parse_write_request},
        encoders={"Read": encoded},
    )


@dataclass
class _Upload:
    """An unfinished write that a client may resume under the same name."""

    writer: BlobWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_active: float = field(default_factory=time.monotonic)
    # While no call is writing it: ends its count against the caller's stream limit.
    release: Callable[[], None] | None = None

    def resume(self) -> None:
        """A call writes it again, and counts for it."""
        release, self.release = self.release, None
        if release is not None:
            release()


class _StoreFeed:
    """Hands one upload's data to its store writer, in order, on a worker thread, while
    the event loop goes on receiving. The loop waits only when more than FEED_AHEAD
    bytes are queued (until half of them are written), and at the end: a trip to the
    worker and back per chunk left it waiting ~0.5 ms per MiB for the last hash."""

    def __init__(self, backend: Backend, writer: BlobWriter) -> None:
        self._backend = backend
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()  # guards the fields below, shared with the worker
        self._queue: collections.deque[Chunk] = collections.deque()
        self._queued = 0
        self._working = False
        self._failed = False
        self._room: asyncio.Future[None] | None = None
        self._work: asyncio.Future[None] | None = None  # the latest run of _write_queued

    async def put(self, data: Chunk) -> None:
        """Queue data for the writer; raises the error of a write that failed."""
        start = False
        with self._lock:
            if not self._failed:
                self._queue.append(data)
                self._queued += len(data)
                start, self._working = not self._working, True
                if self._queued > FEED_AHEAD:
                    self._room = self._loop.create_future()
            room, failed = self._room, self._failed
        if failed:
            await self.finish()
        if start:
            self._work = asyncio.ensure_future(self._backend.run(self._write_queued))
        if room is not None:
            await room
            if self._failed:
                await self.finish()

    async def finish(self) -> None:
        """Wait until everything queued is written; raises the error of a failed write."""
        if self._work is not None:
            await self._work

    async def discard(self) -> None:
        """Drop what is queued, let the write under way end, and ignore its error."""
        with self._lock:
            self._queue.clear()
        if self._work is not None:
            await asyncio.wait([self._work])
            if not self._work.cancelled():
                self._work.exception()

    def _write_queued(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._working = False
                    return
                data = self._queue.popleft()
            try:
                self._writer.write(data)
            except BaseException:
                with self._lock:
                    self._queue.clear()
                    self._failed, self._working = True, False
                    room, self._room = self._room, None
                if room is not None:
                    self._loop.call_soon_threadsafe(_set_done, room)
                raise
            with self._lock:
                self._queued -= len(data)
                room = self._room
                if room is not None and self._queued <= FEED_AHEAD // 2:
                    self._room = None
                else:
                    room = None
            if room is not None:
                self._loop.call_soon_threadsafe(_set_done, room)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ByteStreamService(bs_grpc.ByteStreamServicer):
    def __init__(self, backend: Backend, idle_timeout: float = UPLOAD_IDLE_TIMEOUT) -> None:
        self.backend = backend
        self.idle_timeout = idle_timeout
        self._uploads: dict[str, _Upload] = {}
        self._completed: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._sweep: asyncio.TimerHandle | None = None

    # ---- Read ----
    @grpc_errors
    async def Read(  # type: ignore[override]  # yields ReadResponses encoded (add_to_server)
        self, request: bs_pb2.ReadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        name = parse_read_name(request.resource_name)
        instance_ok(name.instance)
        blob = name.blob
        if request.read_offset < 0 or request.read_offset > blob.size:
            raise RpcError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"read_offset {request.read_offset} is outside blob {blob} of {blob.size} bytes",
            )
        if request.read_limit < 0:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "read_limit must not be negative")
        if name.compressed and request.read_limit:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "read_limit is not allowed on compressed reads"
            )
        opened = await self.backend.open_read(blob, request.read_offset, READ_CHUNK)
        if opened is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"blob {blob} not found")
        first, chunks = opened
        remaining = request.read_limit or blob.size - request.read_offset
        if name.compressed:
            async for data in self._compressed(first, chunks):
                yield encode_read_response(data)
            return
        chunk: Chunk | None = first
        while remaining > 0 and chunk is not None:
            if len(chunk) > remaining:
                chunk = chunk[:remaining]
            remaining -= len(chunk)
            yield encode_read_response(chunk)
            if remaining > 0:
                chunk = await self.backend.next_chunk(chunks)

    async def _compressed(
        self, first: Chunk | None, chunks: Iterator[Chunk]
    ) -> AsyncIterator[bytes]:
        compressor = compress_stream()
        chunk = first
        while chunk is not None:
            out = compressor.compress(chunk)
            if out:
                yield out
            chunk = await self.backend.next_chunk(chunks)
        yield compressor.flush()

    # ---- Write ----
    @grpc_errors
    async def Write(  # type: ignore[override]  # requests decoded by add_to_server's parser
        self,
        request_iterator: AsyncIterator[WriteChunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> bs_pb2.WriteResponse:
        self._expire_idle()
        try:
            async with asyncio.timeout(self.idle_timeout):
                first = await anext(aiter(request_iterator), None)
        except TimeoutError:
            raise self._idle_error() from None
        if first is None:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "Write stream carried no request")
        resource = first.resource_name
        name = parse_write_name(resource)
        instance_ok(name.instance)
        done_size = self._completed.get(resource)
        if done_size is not None:
            return bs_pb2.WriteResponse(committed_size=done_size)
        if first.write_offset == 0 and not await self._missing(name):
            # Already stored: finish early without reading the rest.
            return bs_pb2.WriteResponse(committed_size=-1 if name.compressed else name.blob.size)
        upload = self._uploads.get(resource)
        if upload is None:
            if first.write_offset != 0:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"write_offset {first.write_offset} for an upload the server does not hold; "
                    "start at 0",
                )
            writer = await self.backend.run(self.backend.store.open_writer, name.blob)
            upload = self._uploads[resource] = _Upload(writer)
            self._schedule_sweep()
        if upload.lock.locked():
            raise RpcError(
                grpc.StatusCode.ABORTED, f"upload {resource[:200]} is already in progress"
            )
        upload.resume()
        try:
            async with upload.lock:
                return await self._receive(name, resource, upload, first, request_iterator)
        finally:
            if self._uploads.get(resource) is upload:  # kept for a resume
                upload.release = _hold_stream(resource)
                upload.last_active = time.monotonic()

    def _idle_error(self) -> RpcError:
        return RpcError(
            grpc.StatusCode.ABORTED,
            f"upload idle for more than {self.idle_timeout:g} s: dropped; start it again",
        )

    async def _missing(self, name: ResourceName) -> bool:
        missing = await self.backend.find_missing([name.blob])
        return bool(missing)

    async def _receive(
        self,
        name: ResourceName,
        resource: str,
        upload: _Upload,
        first: WriteChunk,
        rest: AsyncIterator[WriteChunk],
    ) -> bs_pb2.WriteResponse:
        writer = upload.writer
        # For compressed uploads offsets count compressed bytes, which the
        # writer does not see; such uploads are not resumable and restart at 0.
        decompressor = StreamDecompressor(name.blob.size) if name.compressed else None
        received = writer.committed_size if decompressor is None else 0
        buffer: list[Chunk] = []
        buffered = 0
        accepted = writer.committed_size  # bytes taken for the writer, queued or buffered
        feed = _StoreFeed(self.backend, writer)

        async def flush() -> None:
            nonlocal buffer, buffered
            if buffer:
                # One piece goes as it is: joining would copy it (a view, not bytes).
                data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
                buffer, buffered = [], 0
                await feed.put(data)

        request: WriteChunk | None = first
        finished = False
        loop = asyncio.get_running_loop()
        # Armed only while waiting on the client: a client that sends nothing for
        # idle_timeout loses the upload (its temp file or memory) and the call.
        waiting = asyncio.timeout(None)
        try:
            async with waiting:
                try:
                    while request is not None:
                        if request.resource_name and request.resource_name != resource:
                            raise RpcError(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                "resource_name changed within one Write",
                            )
                        if request.write_offset != received:
                            raise RpcError(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"write_offset {request.write_offset} does not follow "
                                f"the {received} bytes committed",
                            )
                        chunk = request.data  # a view into the received message
                        received += len(chunk)
                        data = decompressor.feed(chunk) if decompressor else chunk
                        if data:
                            if accepted + len(data) > name.blob.size:
                                raise RpcError(
                                    grpc.StatusCode.INVALID_ARGUMENT,
                                    f"more than {name.blob.size} bytes sent for blob {name.blob}",
                                )
                            buffer.append(data)
                            buffered += len(data)
                            accepted += len(data)
                            if buffered >= WRITE_BUFFER:
                                await flush()
                        upload.last_active = time.monotonic()
                        if request.finish_write:
                            finished = True
                            break
                        waiting.reschedule(loop.time() + self.idle_timeout)
                        request = await anext(rest, None)
                        waiting.reschedule(None)
                    await flush()
                    await feed.finish()
                except asyncio.CancelledError:
                    await feed.discard()  # before the upload is dropped or left for a resume
                    # The client went away: what reached the store stays for a resume.
                    if decompressor is not None:
                        self._drop(resource)
                    raise
                except BaseException:
                    await feed.discard()
                    self._drop(resource)
                    raise
        except TimeoutError:
            if not waiting.expired():
                raise
            self._drop(resource)
            raise self._idle_error() from None
        if not finished:
            if decompressor is not None:
                self._drop(resource)
            # The client went away without finishing; keep what it sent for a resume.
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "Write stream ended without finish_write"
            )
        try:
            await self.backend.run(writer.commit)
        finally:
            self._uploads.pop(resource, None)
        self._completed[resource] = received
        while len(self._completed) > REMEMBER_COMPLETED:
            self._completed.popitem(last=False)
        return bs_pb2.WriteResponse(committed_size=received)

    def _drop(self, resource: str) -> None:
        upload = self._uploads.pop(resource, None)
        if upload is not None:
            upload.resume()  # no call counts for it any more: neither does it
            self.backend.executor.submit(upload.writer.abort)

    def _expire_idle(self) -> None:
        """Drop the uploads left for a resume that nobody resumed in idle_timeout."""
        cutoff = time.monotonic() - self.idle_timeout
        for resource, upload in list(self._uploads.items()):
            if upload.last_active < cutoff and not upload.lock.locked():
                self._drop(resource)

    def _schedule_sweep(self) -> None:
        """Have _expire_idle run while uploads are held, with or without new calls."""
        if self._sweep is None and self._uploads:
            self._sweep = asyncio.get_running_loop().call_later(
                self.idle_timeout / 2, self._sweep_idle
            )

    def _sweep_idle(self) -> None:
        self._sweep = None
        self._expire_idle()
        self._schedule_sweep()

    # ---- QueryWriteStatus ----
    @grpc_errors
    async def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bs_pb2.QueryWriteStatusResponse:
        name = parse_write_name(request.resource_name)
        instance_ok(name.instance)
        done_size = self._completed.get(request.resource_name)
        if done_size is not None:
            return bs_pb2.QueryWriteStatusResponse(committed_size=done_size, complete=True)
        upload = self._uploads.get(request.resource_name)
        if upload is not None and not name.compressed:
            return bs_pb2.QueryWriteStatusResponse(committed_size=upload.writer.committed_size)
        if not await self._missing(name):
            size = -1 if name.compressed else name.blob.size
            return bs_pb2.QueryWriteStatusResponse(committed_size=size, complete=True)
        return bs_pb2.QueryWriteStatusResponse(committed_size=0, complete=False)


def _hold_stream(resource: str) -> Callable[[], None] | None:
    """Count the upload named resource, left for a resume, against its caller's stream
    limit, as the call that wrote it counted; its release, None where no limit counts."""
    call = current_call()
    hold = call.notes.get(HOLD_STREAM) if call is not None else None
    return hold(resource) if hold is not None else None
