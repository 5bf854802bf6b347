"""What every HTTP protocol front end shares: its interface, and bodies in and out.

A front end (one module per protocol: http_bazel, http_ccache, ...) declares the
routes it serves and the scopes each needs, parses a request path into a
`Target`, and serves it from the store. Everything else every request needs
(the caller, its scopes and limits, metrics, the audit log, logs, mapping errors
to statuses) is the shared pipeline's job (cache_server.http_endpoint, around
the hooks of cache_server.calls), as it is for the gRPC services.
"""

from __future__ import annotations

import abc
import hashlib
import re
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, ClassVar

from aiohttp import web

from slipstream.cache_server.services.common import Backend, HttpError
from slipstream.cache_server.storage.base import Chunk, Store
from slipstream.core.digests import BlobId

CHUNK = 1 << 20  # bytes handed to or taken from the store at a time
SPOOL_IN_MEMORY = 1 << 20  # a body whose hash is not known up front spills to a file past this
SEGMENT = re.compile(r"[A-Za-z0-9_.~-]{1,100}")
_POINTER = re.compile(rb"([0-9a-f]{64})/([0-9]{1,20})")


@dataclass(frozen=True)
class Target:
    """What a request path names."""

    route: str  # the front end's name for the kind of entry: "cas", "ac", "ccache", ...
    instance: str  # a namespace within the route ("" if none)
    key: str  # the entry's key within it


class HttpFrontEnd(abc.ABC):
    """One HTTP protocol served on the HTTP endpoint."""

    # The first path segment reserved for this protocol ("ccache"), or None for the
    # front end that serves every path no other one reserves.
    prefix: ClassVar[str | None] = None
    # (route, HTTP method) -> the scopes a caller needs for it, all of them.
    scopes: ClassVar[Mapping[tuple[str, str], tuple[str, ...]]] = {}

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.store: Store = backend.store

    @abc.abstractmethod
    def parse(self, segments: list[str], shown: str) -> Target:
        """The target of a path's segments (after the prefix, if any); HttpError 400 if none."""

    @abc.abstractmethod
    async def serve(
        self, request: web.Request, target: Target, limits: Any
    ) -> tuple[web.StreamResponse, bool | None]:
        """Serve the request; the response, and for a lookup whether it was a hit.

        limits: the caller's (cache_server.auth.Limits). Raise HttpError, or a store
        error, for the pipeline to answer."""

    def audit(self, method: str, target: Target) -> dict[str, object] | None:
        """Audit-log fields for a write taken on trust ("event" among them), else None."""
        return None

    def methods(self, route: str) -> tuple[str, ...]:
        return tuple(method for (r, method) in self.scopes if r == route)


def text(status: int, message: str) -> web.Response:
    """A one-line plain-text response."""
    return web.Response(status=status, text=" ".join(message.split())[:500] + "\n")


async def head(request: web.Request, size: int) -> web.StreamResponse:
    """The answer to HEAD of an entry of size bytes."""
    response = web.StreamResponse(status=200)
    response.content_type = "application/octet-stream"
    response.content_length = size
    await response.prepare(request)
    return response


def check_length(request: web.Request, limit: int | None, what: str) -> None:
    """413 before reading a body whose Content-Length is over limit."""
    length = request.content_length
    if length is not None and limit is not None and length > limit:
        raise HttpError(
            413, f"{what} of {length:,} bytes is over the {limit:,}-byte limit", close=True
        )


async def body(request: web.Request, limit: int | None) -> AsyncIterator[bytes]:
    """The request body in pieces of about CHUNK bytes; 413 past limit."""
    buffer = bytearray()
    total = 0
    while piece := await request.content.read(CHUNK):
        total += len(piece)
        if limit is not None and total > limit:
            raise HttpError(413, f"the body is over the {limit:,}-byte limit", close=True)
        buffer += piece
        if len(buffer) >= CHUNK:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)
    length = request.content_length
    if length is not None and total < length:
        raise HttpError(400, f"the body ended at {total:,} of {length:,} bytes", close=True)


async def spool(
    backend: Backend, request: web.Request, limit: int | None
) -> tuple[BlobId, IO[bytes]]:
    """The body in a temporary file (in memory while small), and its digest."""
    spooled: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
    sha = hashlib.sha256()
    size = 0

    def add(chunk: bytes) -> None:
        sha.update(chunk)
        spooled.write(chunk)

    try:
        async for chunk in body(request, limit):
            await backend.run(add, chunk)
            size += len(chunk)
    except BaseException:
        spooled.close()
        raise
    return BlobId(sha.hexdigest(), size), spooled


def store_spooled(store: Store, blob: BlobId, spooled: IO[bytes]) -> None:
    """Store a spooled body as blob (verified on the way in), unless it is there already."""
    if not store.find_missing([blob]):
        return  # already there (and now fresher)
    writer = store.open_writer(blob)
    try:
        spooled.seek(0)
        while chunk := spooled.read(CHUNK):
            writer.write(chunk)
        writer.commit()
    finally:
        writer.abort()


async def stream(
    backend: Backend, request: web.Request, blob: BlobId, chunks: Iterator[Chunk]
) -> web.StreamResponse:
    """A 200 response streaming a blob's chunks from the store."""
    response = web.StreamResponse(status=200)
    response.content_type = "application/octet-stream"
    response.content_length = blob.size
    try:
        await response.prepare(request)
        while (chunk := await backend.next_chunk(chunks)) is not None:
            await response.write(chunk)
    except ConnectionError:
        raise
    except Exception:
        # The status line is gone: all that is left is to cut the body short.
        response.force_close()
        raise
    finally:
        close = getattr(chunks, "close", None)
        if callable(close):
            await backend.run(close)
    return response


class KeyedBlobs:
    """Entries whose content is a CAS blob and whose key is an evictable record naming it.

    The protocols whose keys are taken on trust (ccache, and build tools' own caches)
    keep their entries this way: identical contents are stored once, both the key and
    the blob count toward the store's size bound and LRU, and a key whose blob was
    evicted reads as missing (and is dropped).
    """

    def __init__(self, store: Store, namespace: str) -> None:
        self.store = store
        self.namespace = namespace

    def lookup(self, key: str) -> BlobId | None:
        """The blob key names, if both are present (refreshes both)."""
        value = self.store.get_record(self.namespace, key)
        m = _POINTER.fullmatch(value) if value is not None else None
        blob = BlobId(m.group(1).decode(), int(m.group(2))) if m else None
        if blob is None or self.store.find_missing([blob]):
            if value is not None:  # a stale key: its blob was evicted
                self.store.delete_record(self.namespace, key)
            return None
        return blob

    def open(self, key: str) -> tuple[BlobId, bytes | Iterator[Chunk]] | None:
        """The entry's blob and content: whole if small, else chunks. One worker-thread trip."""
        blob = self.lookup(key)
        return None if blob is None else open_blob(self.store, blob)

    def point(self, key: str, blob: BlobId) -> None:
        self.store.put_record(self.namespace, key, f"{blob.hash}/{blob.size}".encode())

    def put_bytes(self, key: str, data: bytes) -> None:
        blob = BlobId.of(data)
        if self.store.find_missing([blob]):
            self.store.put_blob(blob, data)
        self.point(key, blob)

    def put_spooled(self, key: str, blob: BlobId, spooled: IO[bytes]) -> None:
        store_spooled(self.store, blob, spooled)
        self.point(key, blob)

    def delete(self, key: str) -> None:
        self.store.delete_record(self.namespace, key)

    async def put_body(
        self, backend: Backend, request: web.Request, key: str, limit: int | None
    ) -> None:
        """Store the request body under key: small bodies in one worker-thread trip."""
        length = request.content_length
        if length is not None and length <= CHUNK:
            data = await request.read()
            if len(data) != length:
                raise HttpError(400, f"the body ended at {len(data):,} of {length:,} bytes")
            await backend.run(self.put_bytes, key, data)
            return
        blob, spooled = await spool(backend, request, limit)
        try:
            await backend.run(self.put_spooled, key, blob, spooled)
        finally:
            spooled.close()


def open_blob(store: Store, blob: BlobId) -> tuple[BlobId, bytes | Iterator[Chunk]] | None:
    """A present blob's content: whole if small, else chunks; None if it is gone."""
    content: bytes | Iterator[Chunk] | None = (
        store.get_blob(blob) if blob.size <= CHUNK else store.read_blob(blob, 0, CHUNK)
    )
    return None if content is None else (blob, content)


async def blob_response(
    backend: Backend,
    request: web.Request,
    opened: tuple[BlobId, bytes | Iterator[Chunk]] | None,
    missing: str,
) -> tuple[web.StreamResponse, bool]:
    """The answer to GET of an opened entry (None: 404 saying missing), and whether it hit."""
    if opened is None:
        return text(404, missing), False
    blob, content = opened
    if isinstance(content, bytes):
        return web.Response(body=content, content_type="application/octet-stream"), True
    return await stream(backend, request, blob, content), True


async def head_response(
    request: web.Request, size: int | None, missing: str
) -> tuple[web.StreamResponse, bool]:
    """The answer to HEAD of an entry of size bytes (None: 404 saying missing), and hit."""
    if size is None:
        return text(404, missing), False
    return await head(request, size), True
