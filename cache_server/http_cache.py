"""The HTTP cache endpoint: Bazel's HTTP remote cache and ccache's remote storage.

Served on its own port (`slipstream serve --http-listen HOST:PORT`) from the same
event loop, store and worker threads as the gRPC services, so an entry written
over one protocol is read over the other:

    GET/HEAD/PUT  /[INSTANCE/]cas/SHA256     CAS blobs; a PUT is verified (hash, and
                                             size = body length) before it is visible
    GET/HEAD/PUT  /[INSTANCE/]ac/SHA256      action results (a serialized ActionResult),
                                             the entries of the gRPC ActionCache under
                                             the same instance name; a GET answers 404
                                             unless every blob the result names is there
    GET/HEAD/PUT/DELETE  /ccache/[NAME/]KEY  ccache entries, in any of ccache's layouts:
                                             subdirs  3b/964j95...  (2 + 31 characters)
                                             flat     3b964j95...   (33 characters)
                                             bazel    ac/<64 hex digits>

Bazel: `--remote_cache=http://HOST:PORT[/INSTANCE]`. ccache:
`remote_storage = http://HOST:PORT/ccache[/NAME]|layout=subdirs`. The first path
segment `ccache` is therefore not an instance name of the Bazel routes.

A ccache entry is not an action result (nothing to check it against), so it
lives apart from the action cache: its content is a CAS blob, and the key
points at it from an evictable "ccache" record. Both count toward the store's
size bound and LRU like CAS blobs and action results; ccache never evicts
remote entries itself.

Bodies stream both ways, 1 MiB at a time, and never sit whole in memory: a CAS
PUT goes straight into the store's verifying writer, a ccache PUT (whose hash is
not known up front) through a spool file that is hashed as it fills.

Access is that of the gRPC port: `Authorization: Bearer TOKEN` (Bazel:
`--remote_header=Authorization=Bearer TOKEN`; ccache: `|bearer-token=TOKEN`), or
HTTP Basic with the token as the password (`http://user:TOKEN@HOST:PORT`). GET
and HEAD need `read`, a PUT to /cas `cas-write`, a PUT to /ac `ac-write`. A ccache
PUT or DELETE needs `ac-write` and `cas-write`: the content goes into the CAS,
but the key is taken on trust, so whoever may write one can poison every compile
that reads it, just as with an action result. `--read-only-ac` refuses /ac and
ccache writes alike. No token where one is needed: 401; a missing scope: 403.
The audit log (--audit-log) gets a line for every /ac and ccache write, refused
ones too ("protocol": "http"). Requests are counted in the Prometheus metrics
(slipstream_http_requests_total, and hits and misses in slipstream_cache_lookups_total).

Bad input gets a 4xx status and a one-line text body, never a traceback: a
malformed path, hash or key, or a path trick (400); a body that does not match
its hash or is not an ActionResult (400, nothing stored); a blob over the
caller's --max-blob-size or the store's bound (413); too many requests in flight
for one caller (429); an unsupported method (405).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import datetime
import hashlib
import logging
import os
import re
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import IO

from aiohttp import web
from google.protobuf.message import DecodeError

from slipstream.cache_server.auth import AC_WRITE, CAS_WRITE, READ, Caller
from slipstream.cache_server.config import TlsConfig
from slipstream.cache_server.operations import Operations
from slipstream.cache_server.services.action_cache import AC_NAMESPACE, action_key, referenced_blobs
from slipstream.cache_server.services.common import MAX_BATCH_TOTAL_SIZE, Backend, RpcError
from slipstream.cache_server.storage.base import (
    BlobWriter,
    Chunk,
    RecordKeyError,
    StoreFull,
    StoreUnavailable,
)
from slipstream.core.digests import BlobId, DigestError
from slipstream.protos import remote_execution_pb2 as re_pb2

log = logging.getLogger("cache_server")
access_log = logging.getLogger("cache_server.access")

CCACHE_NAMESPACE = "ccache"
CCACHE_PREFIX = "ccache"
CHUNK = 1 << 20  # bytes handed to or taken from the store at a time
SPOOL_IN_MEMORY = 1 << 20  # a ccache PUT spills to a temporary file past this

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SEGMENT = re.compile(r"[A-Za-z0-9_.~-]{1,100}")
_CCACHE_DIR = re.compile(r"[0-9a-f]{2}")
_CCACHE_REST = re.compile(r"[0-9a-v]{31}")
_CCACHE_FLAT = re.compile(r"[0-9a-f]{2}[0-9a-v]{31}")
_POINTER = re.compile(rb"([0-9a-f]{64})/([0-9]{1,20})")
_GRPC_TO_HTTP = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}


class HttpError(Exception):
    """Answer the request with this status and one-line message."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close  # the body was not read: do not keep the connection


@dataclass(frozen=True)
class Target:
    """What a request path names."""

    route: str  # "cas", "ac" or "ccache"
    instance: str  # the instance name (cas, ac) or the ccache NAME, "" if none
    key: str  # the sha256 (cas, ac) or the ccache record key

    @property
    def methods(self) -> tuple[str, ...]:
        reads_and_put = ("GET", "HEAD", "PUT")
        return (*reads_and_put, "DELETE") if self.route == "ccache" else reads_and_put


def parse_path(raw_path: str) -> Target:
    """The target of a raw (not percent-decoded) request path; HttpError 400 if invalid."""
    path = raw_path.split("?", 1)[0]
    if not path.startswith("/"):
        raise HttpError(400, "the path must start with /")
    segments = path[1:].split("/")
    shown = path[:120]
    for seg in segments:
        if seg in ("", ".", "..") or not _SEGMENT.fullmatch(seg):
            raise HttpError(
                400,
                f"path {shown!r} is not valid: segments are letters, digits and _.~- "
                "(no empty, '.' or '..' segments, no percent-encoding)",
            )
    if segments[0] == CCACHE_PREFIX:
        return _ccache_target(segments[1:], shown)
    if len(segments) < 2 or segments[-2] not in ("cas", "ac"):
        raise HttpError(
            400,
            f"path {shown!r} is not /[INSTANCE/]cas/SHA256, /[INSTANCE/]ac/SHA256 "
            "or /ccache/[NAME/]KEY",
        )
    route, sha256 = segments[-2], segments[-1]
    if not _HEX64.fullmatch(sha256):
        raise HttpError(400, f"{sha256[:80]!r} is not a SHA-256: 64 lowercase hex digits")
    return Target(route, "/".join(segments[:-2]), sha256)


def _ccache_target(rest: list[str], shown: str) -> Target:
    if len(rest) >= 2 and rest[-2] == "ac" and _HEX64.fullmatch(rest[-1]):
        name, key = rest[:-2], f"ac/{rest[-1]}"  # layout=bazel
    elif len(rest) >= 2 and _CCACHE_DIR.fullmatch(rest[-2]) and _CCACHE_REST.fullmatch(rest[-1]):
        name, key = rest[:-2], rest[-2] + rest[-1]  # layout=subdirs
    elif rest and _CCACHE_FLAT.fullmatch(rest[-1]):
        name, key = rest[:-1], rest[-1]  # layout=flat
    else:
        raise HttpError(
            400,
            f"path {shown!r} is not a ccache entry: /ccache/[NAME/]KEY with a 33-character "
            "KEY (layout flat), KEY as 2/31 characters (subdirs) or ac/SHA256 (bazel)",
        )
    instance = "/".join(name)
    # subdirs and flat name the same entry; the bazel layout's keys are different strings.
    return Target("ccache", instance, f"{instance}/{key}" if instance else key)


def _pointer(blob: BlobId) -> bytes:
    return f"{blob.hash}/{blob.size}".encode()


def _from_pointer(value: bytes) -> BlobId | None:
    m = _POINTER.fullmatch(value)
    return BlobId(m.group(1).decode(), int(m.group(2))) if m else None


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=" ".join(message.split())[:500] + "\n")


def _bearer(header: str | None) -> str | None:
    """The authorization header as auth reads it; HTTP Basic's password is the token."""
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return header
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise HttpError(401, "the Basic authorization header does not decode") from None
    return f"Bearer {decoded.partition(':')[2]}"


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server SSL context from PEM bytes (the ssl module loads only files)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="slipstream-tls-") as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert, tls.cert), (key, tls.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)
    if tls.client_ca is not None:
        ctx.load_verify_locations(cadata=tls.client_ca.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class HttpCache:
    """The aiohttp application and its listening site."""

    def __init__(self, backend: Backend, ops: Operations) -> None:
        self.backend = backend
        self.store = backend.store
        self.ops = ops
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.app = web.Application(handler_args={"max_field_size": 16384})
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, listen: str) -> int:
        """Listen on HOST:PORT (port 0 picks one); returns the port."""
        host, _, port = listen.rpartition(":")
        tls = self.ops.config.tls
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(
            self.runner,
            host.strip("[]"),
            int(port),
            ssl_context=ssl_context(tls) if tls is not None else None,
            shutdown_timeout=5.0,
        )
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            raise OSError(f"cannot serve HTTP on {listen}: {exc.strerror or exc}") from None
        self.port = int(self.runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # ---- one request ----
    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        route, hit = "invalid", None
        target: Target | None = None
        caller: Caller | None = None
        response: web.StreamResponse
        try:
            target = parse_path(request.raw_path)
            route = target.route
            if request.method not in target.methods:
                raise HttpError(405, f"{request.method} is not served on {route} paths")
            caller = self._identify(request)
            self._check_scopes(request, target, caller)
            with self._counted(caller, request):
                response, hit = await self._serve(request, target, caller)
        except HttpError as exc:
            response = _text(exc.status, exc.message)
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="slipstream"'
            if exc.status == 405:
                response.headers["Allow"] = ", ".join(Target(route, "", "").methods)
            if exc.close:
                response.force_close()
        except (DigestError, RecordKeyError) as exc:
            response = _text(400, str(exc))
            response.force_close()
        except StoreFull as exc:
            response = _text(413, str(exc))
            response.force_close()
        except StoreUnavailable as exc:
            response = _text(503, str(exc))
        except ConnectionError as exc:
            # The client went away (e.g. mid-upload): nothing stored, no one to answer.
            log.info("HTTP %s %s: connection lost: %s", request.method, request.path[:200], exc)
            response = _text(400, "connection lost")
            response.force_close()
        except Exception as exc:
            log.exception("internal error serving HTTP %s %s", request.method, request.path)
            response = _text(500, f"internal error: {type(exc).__name__}")
            response.force_close()
        seconds = time.monotonic() - started
        if target is not None:
            self._audit(request, caller, target, response)
        self.ops.metrics.http_request(route, request.method, response.status, seconds, hit)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "HTTP %s %s %d %.1fms",
                request.method,
                request.path[:200],
                response.status,
                seconds * 1000,
                extra={"http_status": response.status, "caller": caller.name if caller else "-"},
            )
        return response

    def _identify(self, request: web.Request) -> Caller:
        try:
            return self.ops.auth.identify_header(_bearer(request.headers.get("Authorization")))
        except RpcError as exc:
            raise HttpError(_GRPC_TO_HTTP.get(exc.code.name, 401), exc.message) from None

    def _check_scopes(self, request: web.Request, target: Target, caller: Caller) -> None:
        needed = [READ]
        if request.method in ("PUT", "DELETE"):
            needed = {"cas": [CAS_WRITE], "ac": [AC_WRITE]}.get(target.route, [AC_WRITE, CAS_WRITE])
        missing = [s for s in needed if not caller.allows(s)]
        if missing:
            who = f"caller {caller.name!r}" if caller.authenticated else "an anonymous caller"
            raise HttpError(
                403,
                f"{request.method} on {target.route} needs scope {missing[0]!r}, "
                f"which {who} does not have",
            )
        writes = request.method in ("PUT", "DELETE") and target.route != "cas"
        if writes and not self.backend.update_enabled:
            raise HttpError(403, "action cache and ccache updates are disabled")

    @contextlib.contextmanager
    def _counted(self, caller: Caller, request: web.Request) -> Iterator[None]:
        """Per-caller requests in flight, against the caller's --max-streams."""
        key = caller.name if caller.authenticated else f"anonymous@{request.remote}"
        limit = caller.limits.max_streams
        if limit is not None and self.in_flight[key] >= limit:
            raise HttpError(
                429, f"{self.in_flight[key]} requests in flight already; the limit is {limit}"
            )
        self.in_flight[key] += 1
        try:
            yield
        finally:
            self.in_flight[key] -= 1
            if self.in_flight[key] <= 0:
                del self.in_flight[key]

    async def _serve(
        self, request: web.Request, target: Target, caller: Caller
    ) -> tuple[web.StreamResponse, bool | None]:
        method = request.method
        if target.route == "cas":
            if method == "PUT":
                await self._put_cas(request, target.key, caller)
                return _text(200, "stored"), None
        elif target.route == "ac":
            key = action_key(target.instance, BlobId(target.key, 0))  # the size is not in keys
            if method == "PUT":
                await self._put_ac(request, key)
                return _text(200, "stored"), None
            data = await self.backend.run(self._complete_result, key)
            if data is None:
                return _text(404, f"no complete action result for {target.key}"), False
            if method == "HEAD":
                return await self._head(request, len(data)), True
            return web.Response(body=data, content_type="application/octet-stream"), True
        else:
            if method == "PUT":
                await self._put_ccache(request, target, caller)
                return _text(200, "stored"), None
            if method == "DELETE":
                await self.backend.run(self.store.delete_record, CCACHE_NAMESPACE, target.key)
                return _text(200, "deleted"), None
        missing = _text(404, f"no {target.route} entry {target.key}"), False
        if method == "HEAD":
            blob = await self.backend.run(self._lookup, target)
            return missing if blob is None else (await self._head(request, blob.size), True)
        opened = await self.backend.run(self._open, target)
        if opened is None:
            return missing
        blob, content = opened
        if isinstance(content, bytes):
            return web.Response(body=content, content_type="application/octet-stream"), True
        return await self._stream(request, blob, content), True

    async def _head(self, request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_type = "application/octet-stream"
        response.content_length = size
        await response.prepare(request)
        return response

    # ---- reads ----
    def _complete_result(self, key: str) -> bytes | None:
        """The stored action result, if every blob it names is present (see action_cache)."""
        data = self.store.get_record(AC_NAMESPACE, key)
        if data is None:
            return None
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
            needed = referenced_blobs(self.store, result)
        except (DecodeError, DigestError):
            return None
        if needed is None or self.store.find_missing(needed):
            return None
        return data

    def _lookup(self, target: Target) -> BlobId | None:
        """The blob a cas or ccache path names, if present (refreshes it)."""
        if target.route == "cas":
            return self.store.find_blob(target.key)
        return self._ccache_blob(target.key)

    def _open(self, target: Target) -> tuple[BlobId, bytes | Iterator[Chunk]] | None:
        """The blob a cas or ccache path names and its content: whole if small, else chunks.

        One trip to a worker thread for the common small entry.
        """
        blob = self._lookup(target)
        if blob is None:
            return None
        content: bytes | Iterator[Chunk] | None
        if blob.size <= CHUNK:
            content = self.store.get_blob(blob)
        else:
            content = self.store.read_blob(blob, 0, CHUNK)
        return None if content is None else (blob, content)

    def _ccache_blob(self, key: str) -> BlobId | None:
        """The blob a ccache key points at, if both are present (refreshes both)."""
        value = self.store.get_record(CCACHE_NAMESPACE, key)
        blob = _from_pointer(value) if value is not None else None
        if blob is None or self.store.find_missing([blob]):
            if value is not None:  # a stale key: its blob was evicted
                self.store.delete_record(CCACHE_NAMESPACE, key)
            return None
        return blob

    async def _stream(
        self, request: web.Request, blob: BlobId, chunks: Iterator[Chunk]
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_type = "application/octet-stream"
        response.content_length = blob.size
        sent = 0
        try:
            await response.prepare(request)
            while (chunk := await self.backend.next_chunk(chunks)) is not None:
                await response.write(chunk)
                sent += len(chunk)
        except ConnectionError:
            raise
        except Exception as exc:
            # The status line is gone: all that is left is to cut the body short.
            log.warning("HTTP GET of %s failed after %d bytes: %s", blob, sent, exc)
            response.force_close()
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                await self.backend.run(close)
        return response

    # ---- writes ----
    async def _body(self, request: web.Request, limit: int | None) -> AsyncIterator[bytes]:
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

    @staticmethod
    def _check_length(request: web.Request, limit: int | None, what: str) -> None:
        length = request.content_length
        if length is not None and limit is not None and length > limit:
            raise HttpError(
                413, f"{what} of {length:,} bytes is over the {limit:,}-byte limit", close=True
            )

    async def _put_cas(self, request: web.Request, sha256: str, caller: Caller) -> None:
        limit = caller.limits.max_blob_size
        self._check_length(request, limit, "a blob")
        length = request.content_length
        if length is not None and length <= CHUNK:  # small: one trip to a worker thread
            data = await request.read()
            try:
                await self.backend.run(self.store.put_blob, BlobId(sha256, len(data)), data)
            except DigestError as exc:
                raise HttpError(400, f"not stored: {exc}") from None
            return
        if length is None:  # chunked: hash it on the way in, then check
            blob, spool = await self._spool(request, limit)
            try:
                if blob.hash != sha256:
                    raise HttpError(400, f"the body hashes to {blob.hash}, not {sha256}")
                await self.backend.run(self._store_spooled, blob, spool)
            finally:
                spool.close()
            return
        writer: BlobWriter = await self.backend.run(self.store.open_writer, BlobId(sha256, length))
        try:
            async for chunk in self._body(request, limit):
                await self.backend.run(writer.write, chunk)
            await self.backend.run(writer.commit)
        except DigestError as exc:
            raise HttpError(400, f"not stored: {exc}") from None
        finally:
            await self.backend.run(writer.abort)

    async def _spool(self, request: web.Request, limit: int | None) -> tuple[BlobId, IO[bytes]]:
        """The body in a temporary file (in memory while small), and its digest."""
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
        sha = hashlib.sha256()
        size = 0

        def add(chunk: bytes) -> None:
            sha.update(chunk)
            spool.write(chunk)

        try:
            async for chunk in self._body(request, limit):
                await self.backend.run(add, chunk)
                size += len(chunk)
        except BaseException:
            spool.close()
            raise
        return BlobId(sha.hexdigest(), size), spool

    def _store_ccache_bytes(self, key: str, data: bytes) -> None:
        blob = BlobId.of(data)
        if self.store.find_missing([blob]):
            self.store.put_blob(blob, data)
        self.store.put_record(CCACHE_NAMESPACE, key, _pointer(blob))

    def _store_spooled(self, blob: BlobId, spool: IO[bytes]) -> None:
        if not self.store.find_missing([blob]):
            return  # already there (and now fresher)
        writer = self.store.open_writer(blob)
        try:
            spool.seek(0)
            while chunk := spool.read(CHUNK):
                writer.write(chunk)
            writer.commit()
        finally:
            writer.abort()

    async def _put_ac(self, request: web.Request, key: str) -> None:
        self._check_length(request, MAX_BATCH_TOTAL_SIZE, "an action result")
        data = b"".join([c async for c in self._body(request, MAX_BATCH_TOTAL_SIZE)])
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
        except DecodeError:
            raise HttpError(400, "the body is not a serialized ActionResult") from None
        try:
            for out in result.output_files:
                BlobId.from_proto(out.digest)
            for out_dir in result.output_directories:
                BlobId.from_proto(out_dir.tree_digest)
        except DigestError as exc:
            raise HttpError(400, f"the action result names a bad digest: {exc}") from None
        await self.backend.run(self.store.put_record, AC_NAMESPACE, key, result.SerializeToString())

    async def _put_ccache(self, request: web.Request, target: Target, caller: Caller) -> None:
        limit = caller.limits.max_blob_size
        self._check_length(request, limit, "a ccache entry")
        length = request.content_length
        if length is not None and length <= CHUNK:  # small: one trip to a worker thread
            data = await request.read()
            await self.backend.run(self._store_ccache_bytes, target.key, data)
            return
        blob, spool = await self._spool(request, limit)
        try:
            await self.backend.run(self._store_spooled, blob, spool)
        finally:
            spool.close()
        await self.backend.run(self.store.put_record, CCACHE_NAMESPACE, target.key, _pointer(blob))

    def _audit(
        self,
        request: web.Request,
        caller: Caller | None,
        target: Target,
        response: web.StreamResponse,
    ) -> None:
        """One audit line for a write that is taken on trust (/ac, ccache), refused or not."""
        audit = self.ops.audit
        if audit is None or target.route == "cas" or request.method not in ("PUT", "DELETE"):
            return
        event = "ac_write" if target.route == "ac" else f"ccache_{request.method.lower()}"
        record: dict[str, object] = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(),
            "event": event,
            "protocol": "http",
            "caller": caller.name if caller is not None else "anonymous",
            "authenticated": caller.authenticated if caller is not None else False,
            "peer": request.remote,
            "outcome": "OK" if response.status < 300 else f"HTTP {response.status}",
        }
        if target.route == "ac":
            record.update(instance=target.instance, action_digest=target.key)
        else:
            record["key"] = target.key
        if response.status >= 300 and isinstance(response, web.Response) and response.text:
            record["reason"] = response.text.strip()
        audit.write(record)
