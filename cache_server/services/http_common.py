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
import functools
import hashlib
import json
import re
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, ClassVar

from aiohttp import web

from slipstream.cache_server.services.bytestream import UPLOAD_IDLE_TIMEOUT
from slipstream.cache_server.services.common import Backend, HttpError
from slipstream.cache_server.storage.base import BlobWriter, Chunk, Store
from slipstream.core.digests import BlobId, DigestError

CHUNK = 1 << 20  # bytes handed to or taken from the store at a time
SPOOL_IN_MEMORY = 1 << 20  # a body whose hash is not known up front spills to a file past this
SEGMENT = re.compile(r"[A-Za-z0-9_.~-]{1,100}")
_POINTER = re.compile(rb"([0-9a-f]{64})/([0-9]{1,20})")
# What serve() may report of a request's lookups: hit or miss for one entry, or
# (hits, misses) for a request about many.
Lookups = bool | tuple[int, int] | None


@dataclass(frozen=True)
class HttpOptions:
    """Settings of the HTTP front ends from the server's flags."""

    registry_upstreams: tuple[str, ...] = ()  # --registry-upstream [PREFIX=]URL
    registry_tag_ttl: float = 300.0  # --registry-tag-ttl SECONDS
    registry_upstream_auth_file: str | None = None  # --registry-upstream-auth-file FILE
    upload_idle_timeout: float = UPLOAD_IDLE_TIMEOUT  # an idle upload session is dropped
    # OCI upload sessions in this directory, shared by the workers of `serve --workers N`
    # (services/oci_sessions.py); None: in this process.
    upload_sessions_dir: str | None = None


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

    def __init__(self, backend: Backend, options: HttpOptions | None = None) -> None:
        self.backend = backend
        self.store: Store = backend.store
        self.options = options or HttpOptions()

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the front end holds (connections), when the endpoint stops."""

    @abc.abstractmethod
    def parse(self, segments: list[str], shown: str) -> Target:
        """The target of a path's segments (after the prefix, if any); HttpError 400 if none."""

    def parse_request(self, segments: list[str], shown: str, query: Mapping[str, str]) -> Target:
        """The target of a request: parse(), for front ends whose paths say it all; one
        that names a namespace in the query string (Turborepo's ?teamId=) overrides this."""
        return self.parse(segments, shown)

    @abc.abstractmethod
    async def serve(
        self, request: web.Request, target: Target, limits: Any
    ) -> tuple[web.StreamResponse, Lookups]:
        """Serve the request; the response, and for a lookup whether it was a hit
        (for a request about many entries: how many hits and misses).

        limits: the caller's (cache_server.auth.Limits). Raise HttpError, or a store
        error, for the pipeline to answer."""

    def see_operations(self, ops: Any) -> None:  # noqa: B027 - optional hook
        """Given the server's operations (cache_server.operations: metrics, audit log), for a
        front end that shows them; most ignore it."""

    def audit(self, method: str, target: Target) -> dict[str, object] | None:
        """Audit-log fields for a write taken on trust ("event" among them), else None."""
        return None

    def check_segments(self, segments: list[str], shown: str) -> list[str]:
        """The path's segments (after the prefix, if any) once checked; HttpError 400 if
        one is not letters, digits and _.~- (no empty, "." or ".." segment, no
        percent-encoding). A front end whose paths hold other characters narrows this."""
        for seg in segments:
            if seg in ("", ".", "..") or not SEGMENT.fullmatch(seg):
                raise HttpError(
                    400,
                    f"path {shown!r} is not valid: segments are letters, digits and _.~- "
                    "(no empty, '.' or '..' segments, no percent-encoding)",
                )
        return segments

    def refusal(
        self, request: web.Request, status: int, message: str, code: str | None
    ) -> web.Response:
        """The response refusing a request (code: HttpError.code, if any); one line of text
        unless the protocol has its own error format."""
        return text(status, message)

    def methods(self, route: str) -> tuple[str, ...]:
        return tuple(method for (r, method) in self.scopes if r == route)

    def challenge(self, request: web.Request) -> str:
        """The WWW-Authenticate header of a 401 answer."""
        return 'Bearer realm="slipstream"'

    async def credential(self, request: web.Request, target: Target) -> str | None:
        """For a request with no Authorization header: a token the protocol carries some
        other way (the web pages' cookie), as `Bearer TOKEN`; None for most."""
        return None


def text(status: int, message: str) -> web.Response:
    """A one-line plain-text response."""
    return web.Response(status=status, text=" ".join(message.split())[:500] + "\n")


async def head(
    request: web.Request, size: int, headers: Mapping[str, str] | None = None
) -> web.StreamResponse:
    """The answer to HEAD of an entry of size bytes (with these headers too)."""
    response = web.StreamResponse(status=200, headers=headers)
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


async def put_blob_body(
    backend: Backend,
    request: web.Request,
    sha256: str,
    limit: int | None,
    *,
    digest_code: str | None = None,
) -> None:
    """Store the request body as the CAS blob of hash sha256, verified before it is
    visible: streamed into the store's writer when its length is known, else hashed
    on the way into a spool. HttpError 400 (with digest_code) if it does not match."""
    check_length(request, limit, "a blob")
    length = request.content_length
    store = backend.store
    if length is not None and length <= CHUNK:  # small: one trip to a worker thread
        data = await request.read()
        if len(data) != length:
            raise HttpError(400, f"the body ended at {len(data):,} of {length:,} bytes")
        try:
            await backend.run(store.put_blob, BlobId(sha256, len(data)), data)
        except DigestError as exc:
            raise HttpError(400, f"not stored: {exc}", code=digest_code) from None
        return
    if length is None:  # chunked: hash it on the way in, then check
        blob, spooled = await spool(backend, request, limit)
        try:
            if blob.hash != sha256:
                raise HttpError(
                    400, f"the body hashes to {blob.hash}, not {sha256}", code=digest_code
                )
            await backend.run(store_spooled, store, blob, spooled)
        finally:
            spooled.close()
        return
    writer: BlobWriter = await backend.run(store.open_writer, BlobId(sha256, length))
    try:
        async for chunk in body(request, limit):
            await backend.run(writer.write, chunk)
        await backend.run(writer.commit)
    except DigestError as exc:
        raise HttpError(400, f"not stored: {exc}", code=digest_code) from None
    finally:
        await backend.run(writer.abort)


async def stream(
    backend: Backend,
    request: web.Request,
    blob: BlobId,
    chunks: Iterator[Chunk],
    *,
    length: int | None = None,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """A response streaming a blob's chunks from the store (with these headers too): the
    first length bytes of them (all of the blob if None), e.g. a 206 to a range request."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = "application/octet-stream"
    left = blob.size if length is None else length
    response.content_length = left
    try:
        await response.prepare(request)
        while left > 0 and (chunk := await backend.next_chunk(chunks)) is not None:
            if len(chunk) > left:
                chunk = chunk[:left]
            await response.write(chunk)
            left -= len(chunk)
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
    evicted reads as missing (and is dropped). A key may carry a few metadata strings
    (Turborepo's task duration and signature tag), kept in its record beside the pointer.
    """

    def __init__(self, store: Store, namespace: str) -> None:
        self.store = store
        self.namespace = namespace

    def find(self, key: str) -> tuple[BlobId, dict[str, str]] | None:
        """The blob key names and the key's metadata, if both are present (refreshes both)."""
        value = self.store.get_record(self.namespace, key)
        found = _parse_pointer(value) if value is not None else None
        if found is None or self.store.find_missing([found[0]]):
            if value is not None:  # a stale key: its blob was evicted
                self.store.delete_record(self.namespace, key)
            return None
        return found

    def lookup(self, key: str) -> BlobId | None:
        """The blob key names, if both are present (refreshes both)."""
        found = self.find(key)
        return None if found is None else found[0]

    def open(self, key: str) -> tuple[BlobId, bytes | Iterator[Chunk]] | None:
        """The entry's blob and content: whole if small, else chunks. One worker-thread trip."""
        opened = self.open_with_metadata(key)
        return None if opened is None else opened[0]

    def open_with_metadata(
        self, key: str
    ) -> tuple[tuple[BlobId, bytes | Iterator[Chunk]], dict[str, str]] | None:
        """open(), and the key's metadata."""
        found = self.find(key)
        if found is None:
            return None
        opened = open_blob(self.store, found[0])
        return None if opened is None else (opened, found[1])

    async def find_on(self, backend: Backend, key: str) -> tuple[BlobId, dict[str, str]] | None:
        """find(key), in place where the store works from memory (see Backend.run_store)."""
        return await backend.run_store(self.find, key, entries=2)

    async def open_on(
        self, backend: Backend, key: str
    ) -> tuple[tuple[BlobId, bytes | Iterator[Chunk]], dict[str, str]] | None:
        """open_with_metadata(key) for a request: where the store works from memory, in
        place (a large entry's hashing on a worker thread); elsewhere one worker trip."""
        if not self.store.works_in_memory:
            return await backend.run(self.open_with_metadata, key)
        found = await self.find_on(backend, key)
        if found is None:
            return None
        blob, metadata = found
        verified = blob.size if blob.size <= CHUNK else 0  # a chunked read checks as it goes
        opened = await backend.run_store(open_blob, self.store, blob, gil_free_bytes=verified)
        return None if opened is None else (opened, metadata)

    def point(
        self,
        key: str,
        blob: BlobId,
        metadata: Mapping[str, str] | None = None,
        *,
        overwrite: bool = True,
    ) -> bool:
        """Make key name blob; with overwrite=False, False if key names a present entry."""
        value = f"{blob.hash}/{blob.size}".encode()
        if metadata:
            value += b"\n" + json.dumps(dict(metadata), sort_keys=True).encode()
        if overwrite:
            self.store.put_record(self.namespace, key, value)
            return True
        if self.lookup(key) is not None:  # drops a stale key, which a new entry may take
            return False
        return self.store.put_record(self.namespace, key, value, overwrite=False)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        metadata: Mapping[str, str] | None = None,
        *,
        overwrite: bool = True,
    ) -> bool:
        blob = BlobId.of(data)
        if self.store.find_missing([blob]):
            self.store.put_blob(blob, data)
        return self.point(key, blob, metadata, overwrite=overwrite)

    def put_spooled(
        self,
        key: str,
        blob: BlobId,
        spooled: IO[bytes],
        metadata: Mapping[str, str] | None = None,
        *,
        overwrite: bool = True,
    ) -> bool:
        store_spooled(self.store, blob, spooled)
        return self.point(key, blob, metadata, overwrite=overwrite)

    def delete(self, key: str) -> None:
        self.store.delete_record(self.namespace, key)

    async def put_body(
        self,
        backend: Backend,
        request: web.Request,
        key: str,
        limit: int | None,
        metadata: Mapping[str, str] | None = None,
        *,
        overwrite: bool = True,
    ) -> bool:
        """Store the request body under key: small bodies in one worker-thread trip.

        With overwrite=False, False (and the key untouched) if key names a present entry."""
        length = request.content_length
        if length is not None and length <= CHUNK:
            data = await request.read()
            if len(data) != length:
                raise HttpError(400, f"the body ended at {len(data):,} of {length:,} bytes")
            return await backend.run_store(
                functools.partial(self.put_bytes, key, data, metadata, overwrite=overwrite),
                gil_free_bytes=2 * len(data),  # hashed, then verified by the store
                entries=3,
            )
        blob, spooled = await spool(backend, request, limit)
        try:
            return await backend.run(
                functools.partial(
                    self.put_spooled, key, blob, spooled, metadata, overwrite=overwrite
                )
            )
        finally:
            spooled.close()


def _parse_pointer(value: bytes) -> tuple[BlobId, dict[str, str]] | None:
    """The blob and metadata a KeyedBlobs record holds; None if it holds neither."""
    pointer, _, extra = value.partition(b"\n")
    m = _POINTER.fullmatch(pointer)
    if m is None:
        return None
    metadata: dict[str, str] = {}
    if extra:
        try:
            loaded = json.loads(extra)
        except ValueError:
            return None
        if not isinstance(loaded, dict):
            return None
        metadata = {str(k): str(v) for k, v in loaded.items()}
    return BlobId(m.group(1).decode(), int(m.group(2))), metadata


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
    headers: Mapping[str, str] | None = None,
) -> tuple[web.StreamResponse, bool]:
    """The answer to GET of an opened entry (None: 404 saying missing), and whether it hit;
    headers: more headers for a hit's answer."""
    if opened is None:
        return text(404, missing), False
    blob, content = opened
    if isinstance(content, bytes):
        response = web.Response(
            body=content, content_type="application/octet-stream", headers=headers
        )
        return response, True
    return await stream(backend, request, blob, content, headers=headers), True


async def head_response(
    request: web.Request,
    size: int | None,
    missing: str,
    headers: Mapping[str, str] | None = None,
) -> tuple[web.StreamResponse, bool]:
    """The answer to HEAD of an entry of size bytes (None: 404 saying missing), and hit."""
    if size is None:
        return text(404, missing), False
    return await head(request, size, headers), True
