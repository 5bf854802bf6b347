"""What every service shares: the store, its worker threads, and error mapping.

Handlers raise ordinary exceptions; `grpc_errors` turns them into a gRPC status
with a one-line message, so no handler repeats that logic and no client ever
sees a traceback.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from slipstream.cache_server.services.ui_history import HistoryCache
from slipstream.cache_server.storage.base import (
    Chunk,
    DiskFull,
    RecordKeyError,
    Store,
    StoreFull,
    StoreUnavailable,
    no_space,
)
from slipstream.core.digests import BlobId, DigestError, check_digest_function
from slipstream.protos import remote_execution_pb2 as re_pb2

log = logging.getLogger("cache_server")

P = ParamSpec("P")
T = TypeVar("T")

# The batch limit we advertise; it stays below gRPC's default 4 MiB message so
# clients that keep that default can still receive a full batch response.
MAX_BATCH_TOTAL_SIZE = 4 * 1024 * 1024 - 64 * 1024
# What the server accepts in one message: above the batch limit, for overhead.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024


_OUT_OF_HANDLES = frozenset({errno.EMFILE, errno.ENFILE})


class RpcError(Exception):
    """Abort the current call with this status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised while serving a call."""
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    if isinstance(exc, DigestError | RecordKeyError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, StoreFull):  # DiskFull too
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, OSError) and no_space(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"disk full: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno in _OUT_OF_HANDLES:
        # Passes as uploads end or idle ones are dropped: worth a retry.
        return grpc.StatusCode.UNAVAILABLE, f"server busy: {exc.strerror}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


class HttpError(Exception):
    """An HTTP answer: this status and a one-line message.

    code: the protocol's own name for the error where it has one (Turborepo's
    "forbidden", the OCI registry's "DIGEST_INVALID"), for the front end to put in its
    error body."""

    def __init__(
        self, status: int, message: str, *, close: bool = False, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close  # the body was not read: do not keep the connection
        self.code = code


# The HTTP status of each gRPC status, for errors raised in the shared pipeline
# (refusals by the hooks) and by the store.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.OUT_OF_RANGE: 416,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,  # too many calls in flight
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status for an exception raised while serving an HTTP request."""
    if isinstance(exc, HttpError):
        return exc.status, exc.message
    if isinstance(exc, DiskFull) or (isinstance(exc, OSError) and no_space(exc)):
        return 507, status_of(exc)[1]  # Insufficient Storage
    if isinstance(exc, StoreFull):
        return 413, str(exc)  # a blob over what the store can hold
    code, message = status_of(exc)
    return _HTTP_STATUS.get(code, 500), message


def _one_line(message: str) -> str:
    return " ".join(message.split())[:500]


def end_with_status(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> None:
    """Set the status a failed call ends with; the handler then returns.

    Not context.abort(): the AbortError it raises is kept by gRPC's call state,
    which it references in turn, and the traceback in that cycle holds the frames
    of the failed call with what they hold (a batch, a 1 MiB ByteStream chunk)
    until the cycle collector runs. Under a stream of failing uploads that pinned
    hundreds of MiB.
    """
    context.set_code(code)
    context.set_details(_one_line(message))


def _fail(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=exc)
    end_with_status(context, code, message)


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request message that did not parse (see TolerantDecoding)."""

    error: str


def _check_parsed(request: Any) -> Any:
    if isinstance(request, MalformedRequest):
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}")
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}"
            )
        yield request


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:
            return MalformedRequest(" ".join(str(exc).split())[:200])

    return decode


class MethodWrapper(grpc.aio.ServerInterceptor):
    """An interceptor that rewrites the handlers of the methods under some prefixes.

    Subclasses say how in wrap(); the handler is gRPC's RpcMethodHandler, a
    namedtuple whose behaviour and (de)serializers can be replaced.
    """

    def __init__(self, method_prefixes: tuple[str, ...]) -> None:
        self.method_prefixes = method_prefixes
        # method -> (the handler gRPC found, its wrapped form). gRPC hands out the
        # same handler object for every call of a method, so it is wrapped once,
        # not on every call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(self.method_prefixes):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, handler: Any, method: str) -> Any:
        raise NotImplementedError


class TolerantDecoding(MethodWrapper):
    """Hand unparsable requests to the handler, which answers INVALID_ARGUMENT.

    Left to itself gRPC answers UNKNOWN with a Python type name; the protocol
    wants INVALID_ARGUMENT for garbage input.
    """

    def wrap(self, handler: Any, method: str) -> Any:
        if handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))


# The services that are not ours (gRPC's health and reflection), served to anyone.
FOREIGN_SERVICES = ("/grpc.health.", "/grpc.reflection.")


class RejectMalformed(MethodWrapper):
    """For handlers that are not ours (health, reflection): an unparsable request is
    answered INVALID_ARGUMENT, and nothing reaches the log. Left to itself gRPC
    answers UNKNOWN and logs a traceback per call, a log flood for anyone."""

    def wrap(self, handler: Any, method: str) -> Any:
        if handler.request_deserializer is None:
            return handler
        kind = "unary_unary"
        for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            if getattr(handler, name) is not None:
                kind = name
        behavior = _rejecting(getattr(handler, kind), handler.request_streaming)
        return handler._replace(
            request_deserializer=_tolerant(handler.request_deserializer), **{kind: behavior}
        )


def _malformed_status(request: MalformedRequest) -> tuple[grpc.StatusCode, str]:
    return grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}"


def _rejecting(behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
    """behavior, answering INVALID_ARGUMENT to a request that did not parse."""

    async def parsed(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, MalformedRequest):
                # Raised inside a handler we do not own: gRPC ends the call
                # with this status and logs nothing.
                await context.abort(*_malformed_status(request))
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if request_streaming:
                request = parsed(request, context)
            elif isinstance(request, MalformedRequest):
                end_with_status(context, *_malformed_status(request))
                return
            async for response in behavior(request, context):
                yield response

        return stream

    async def unary(request: Any, context: Any) -> Any:
        if request_streaming:
            request = parsed(request, context)
        elif isinstance(request, MalformedRequest):
            end_with_status(context, *_malformed_status(request))
            return None
        return await behavior(request, context)

    return unary


def grpc_errors(method: Callable[P, T]) -> Callable[P, T]:
    """Wrap a servicer method (coroutine or async generator) with error mapping."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                request = _check_parsed(request)
                async for item in method(self, request, context):  # type: ignore[call-arg]
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                _fail(context, exc)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            request = _check_parsed(request)
            return await method(self, request, context)  # type: ignore[call-arg,misc]
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            _fail(context, exc)
        return None  # the status set by _fail goes to the client

    return unary_wrapper  # type: ignore[return-value]


# Bytes hashed or (de)compressed in place rather than on a worker thread by
# Backend.run_store (SHA-256 of 64 KiB takes ~35 us, less than a trip through
# the executor).
IN_PLACE_GIL_FREE = 64 << 10
# A write made in place (Store.writes_in_place) that held the event loop longer than
# this (the kernel throttling writeback to a slow disk, a full journal) sends the
# writes to worker threads for WRITES_OFF_LOOP_SECONDS: one stall, not one per write.
SLOW_IN_PLACE_WRITE = 0.05
WRITES_OFF_LOOP_SECONDS = 30.0


_HANDLER_KINDS = {  # (client streams, server streams)
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    *,
    decoders: dict[str, Callable[[bytes], Any]] | None = None,
    encoders: dict[str, Callable[[Any], bytes]] | None = None,
) -> None:
    """Register servicer's methods as the generated add_*Servicer_to_server does, but
    the methods named in decoders take their requests through them, and those named
    in encoders give their responses through them (cache_server.wire), not protobuf."""
    decoders = decoders or {}
    encoders = encoders or {}
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        make = _HANDLER_KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=decoders.get(method.name, request.FromString),
            response_serializer=encoders.get(method.name, response.SerializeToString),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def encoded(message: bytes) -> bytes:
    """The response serializer of a method that gives its responses encoded."""
    return message


@dataclass
class Backend:
    """The store plus the threads that run its blocking calls."""

    store: Store
    executor: ThreadPoolExecutor
    update_enabled: bool = True
    # Set when the server begins to stop: long work on worker threads checks it and
    # gives up, so shutting down does not wait for it.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Until then (time.monotonic()), writes go to worker threads: see SLOW_IN_PLACE_WRITE.
    writes_off_loop_until: float = 0.0

    @functools.cached_property
    def history(self) -> HistoryCache:
        """The timing history's decoded uploads, one cache for the split service and
        the pages: an upload is decoded once, and their memory is budgeted once."""
        return HistoryCache(self.store)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        # In the caller's context, so log records from store threads name the call.
        run = functools.partial(contextvars.copy_context().run, fn, *args)
        return await loop.run_in_executor(self.executor, run)

    async def run_store(
        self,
        fn: Callable[..., T],
        *args: Any,
        gil_free_bytes: int = 0,
        entries: int = 1,
        writes: bool = False,
    ) -> T:
        """fn(*args), a call on the store touching `entries` blobs or records, writing
        them if `writes`. In place when the store works from memory, or it writes and
        the store's writes wait on nothing (Store.writes_in_place): on a worker thread
        it would hold the GIL all the same, and the trip there and back costs ~50-100
        us. Not if it hashes or (de)compresses more than IN_PLACE_GIL_FREE bytes (those
        let go of the GIL, so a worker thread does them beside the event loop) or
        touches more entries than the store makes in place, nor a write for a while
        after one made in place took longer than SLOW_IN_PLACE_WRITE."""
        store = self.store
        if gil_free_bytes > IN_PLACE_GIL_FREE or (
            store.in_place_entries is not None and entries > store.in_place_entries
        ):
            return await self.run(fn, *args)
        if store.works_in_memory:
            return fn(*args)
        if not (writes and store.writes_in_place):
            return await self.run(fn, *args)
        started = time.monotonic()
        if started < self.writes_off_loop_until:
            return await self.run(fn, *args)
        try:
            return fn(*args)
        finally:
            took = time.monotonic() - started
            if took > SLOW_IN_PLACE_WRITE:
                self.writes_off_loop_until = started + took + WRITES_OFF_LOOP_SECONDS
                log.warning(
                    "a write held the event loop for %.0f ms: writes go to worker threads "
                    "for the next %.0f s",
                    took * 1000,
                    WRITES_OFF_LOOP_SECONDS,
                )

    async def find_missing(self, blobs: list[BlobId]) -> list[BlobId]:
        """The store's find_missing, in place when the store answers from memory."""
        if self.store.finds_in_memory:
            return self.store.find_missing(blobs)
        return await self.run(self.store.find_missing, blobs)

    async def open_read(
        self, blob: BlobId, offset: int, chunk_size: int
    ) -> tuple[Chunk | None, Iterator[Chunk]] | None:
        """The store's read_blob and its first chunk (None: nothing from offset on),
        taken in one worker-thread trip: a blob of one chunk costs one trip, not two;
        None if the blob is missing."""
        return await self.run(_read_first, self.store, blob, offset, chunk_size)

    async def next_chunk(self, chunks: Iterator[Chunk]) -> Chunk | None:
        """The next chunk of a read_blob iterator, None after the last one; taken in
        place when the store reads from memory (a worker-thread trip per chunk cost
        in-memory ByteStream reads 15-30%)."""
        if self.store.reads_in_memory:
            return next(chunks, None)
        return await self.run(next, chunks, None)


def _read_first(
    store: Store, blob: BlobId, offset: int, chunk_size: int
) -> tuple[Chunk | None, Iterator[Chunk]] | None:
    chunks = store.read_blob(blob, offset, chunk_size)
    return None if chunks is None else (next(chunks, None), chunks)


def blob_from_request(digest: re_pb2.Digest, what: str = "digest") -> BlobId:
    """A validated BlobId from a request digest, or INVALID_ARGUMENT naming the field."""
    try:
        return BlobId.from_proto(digest)
    except DigestError as exc:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {exc}") from None


def blobs_from_request(digests: Iterable[re_pb2.Digest], what: str) -> list[BlobId]:
    """Validated BlobIds of a request's digests, or INVALID_ARGUMENT naming the field."""
    try:
        return BlobId.from_protos(digests)
    except DigestError as exc:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {exc}") from None


def check_function(value: int) -> None:
    try:
        check_digest_function(value)
    except DigestError as exc:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def instance_ok(instance_name: str) -> str:
    """Instance names are free-form, but must not smuggle path tricks."""
    parts = instance_name.split("/") if instance_name else []
    if any(p in ("", ".", "..") for p in parts) or "\0" in instance_name:
        raise RpcError(
            grpc.StatusCode.INVALID_ARGUMENT, f"instance name {instance_name!r} is not valid"
        )
    return instance_name
