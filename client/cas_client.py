"""A typed, threaded client for the REAPI ContentAddressableStorage.

    with CasClient(connect("127.0.0.1:9380")) as cas:
        missing = cas.find_missing(blobs)
        cas.upload({blob: path_or_bytes for blob in missing})
        cas.download(blobs, write)

Small blobs travel in BatchUpdateBlobs / BatchReadBlobs calls packed under the
server's advertised max_batch_total_size_bytes; large ones go by ByteStream in
chunks. Calls run in parallel on a thread pool. zstd is used on the wire when
the server offers it. Every downloaded blob is checked against its digest.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc
import zstandard

from slipstream.core.compression import StreamDecompressor
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import bytestream_pb2_grpc as bs_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc

T = TypeVar("T")
R = TypeVar("R")

CHUNK_SIZE = 1 << 20  # ByteStream chunk, and the largest blob sent in a batch
FIND_MISSING_CHUNK = 10_000  # digests per FindMissingBlobs call
FALLBACK_BATCH_BYTES = 4 * 1024 * 1024 - 64 * 1024  # when Capabilities says nothing
PER_ITEM_OVERHEAD = 128  # bytes a batch entry costs besides its data (digest, tags)
MIN_COMPRESS = 512  # below this, zstd framing costs more than it saves
MAX_MESSAGE = 32 << 20

BlobSource = bytes | Path  # content in memory, or a file to read it from
ProgressFn = Callable[[int], None]  # called with content bytes as they are transferred
BlobWriter = Callable[[BlobId, Iterator[bytes]], None]


class CasError(Exception):
    """A CAS operation failed; the message is one line."""


class ServerUnavailable(CasError):
    """The server cannot be reached."""


class BlobMissing(CasError):
    """Blobs the caller asked for are not in the CAS."""

    def __init__(self, blobs: Sequence[BlobId]) -> None:
        super().__init__(f"{len(blobs)} blob(s) missing from the CAS, e.g. {blobs[0]}")
        self.blobs = list(blobs)


class BlobMismatch(CasError):
    """Content does not match its digest (corrupt download, or a file changed while read)."""


class HeaderInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds fixed metadata (e.g. `authorization: Bearer TOKEN`) to every call on a channel."""

    def __init__(self, headers: Sequence[tuple[str, str]]) -> None:
        self.headers = list(headers)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self.headers])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def connect(address: str) -> grpc.Channel:
    """A channel to `HOST:PORT`, `grpc://HOST:PORT` or `grpcs://HOST:PORT` (TLS).

    The environment completes it: $SLIPSTREAM_TOKEN is sent as a bearer token,
    $SLIPSTREAM_TLS_CA names the CA bundle that signs the server's certificate
    (and turns TLS on), and $SLIPSTREAM_TLS_CERT / $SLIPSTREAM_TLS_KEY name this
    client's certificate for servers that require one (mutual TLS).
    """
    scheme, sep, rest = address.partition("://")
    target = rest if sep else address
    ca, cert, key = (os.environ.get(f"SLIPSTREAM_TLS_{n}") for n in ("CA", "CERT", "KEY"))
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    if scheme == "grpcs" or (sep == "" and ca):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca),
            private_key=_read(key),
            certificate_chain=_read(cert),
        )
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    token = os.environ.get("SLIPSTREAM_TOKEN")
    if not token:
        return channel
    return grpc.intercept_channel(channel, HeaderInterceptor([bearer(token)]))


def bearer(token: str) -> tuple[str, str]:
    """The metadata entry that carries a token."""
    return ("authorization", f"Bearer {token}")


def wait_ready(channel: grpc.Channel, timeout: float) -> str | None:
    """None once the channel is ready; else why not (refused fast, or timed out)."""
    states: list[grpc.ChannelConnectivity] = []
    changed = threading.Condition()

    def note(state: grpc.ChannelConnectivity) -> None:
        with changed:
            states.append(state)
            changed.notify_all()

    channel.subscribe(note, try_to_connect=True)
    try:
        with changed:
            done = changed.wait_for(
                lambda: (
                    bool(states)
                    and states[-1]
                    in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
                ),
                timeout,
            )
            if not done:
                return f"no answer within {timeout:.0f}s"
            if states[-1] is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                return "connection failed"
            return None
    finally:
        channel.unsubscribe(note)


def connect_ready(address: str, timeout: float) -> grpc.Channel:
    """connect(address), once the server answers; ServerUnavailable (one line) if it does not."""
    channel = connect(address)
    problem = wait_ready(channel, timeout)
    if problem:
        channel.close()
        raise ServerUnavailable(f"cannot reach the server at {address} ({problem})")
    return channel


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CasError(f"cannot read {path}: {exc.strerror}") from None


def rpc_error(exc: grpc.RpcError, what: str) -> CasError:
    """A one-line CasError (ServerUnavailable for UNAVAILABLE) from a gRPC error."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    details = " ".join(details.split())[:300]
    if code is grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailable(f"{what}: server unavailable ({details})")
    name = code.name if code is not None else "ERROR"
    return CasError(f"{what}: {name}: {details}")


@dataclass(frozen=True, slots=True)
class CasLimits:
    """What the server advertises that changes how we talk to it."""

    max_batch_bytes: int
    zstd: bool  # zstd accepted in batch updates and compressed-blobs resource names


@dataclass
class TransferStats:
    """Counts for one upload or download."""

    blobs: int = 0
    bytes: int = 0  # content bytes
    wire_bytes: int = 0  # payload bytes on the wire, after compression
    batch_calls: int = 0
    stream_calls: int = 0

    def add(self, other: TransferStats) -> None:
        self.blobs += other.blobs
        self.bytes += other.bytes
        self.wire_bytes += other.wire_bytes
        self.batch_calls += other.batch_calls
        self.stream_calls += other.stream_calls


def plan_batches(blobs: Iterable[BlobId], limit: int) -> list[list[BlobId]]:
    """Pack blobs into batches whose size plus per-item overhead stays within limit.

    Pure: blobs are taken in the given order; each must fit in a batch alone.
    """
    batches: list[list[BlobId]] = []
    current: list[BlobId] = []
    total = 0
    for blob in blobs:
        cost = blob.size + PER_ITEM_OVERHEAD
        if cost > limit:
            raise ValueError(f"blob {blob} does not fit in a batch of {limit} bytes")
        if current and total + cost > limit:
            batches.append(current)
            current, total = [], 0
        current.append(blob)
        total += cost
    if current:
        batches.append(current)
    return batches


def _read_source(source: BlobSource) -> bytes:
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """One compressor per thread: making one costs more than compressing a small blob."""
    if not hasattr(_local, "zstd"):
        _local.zstd = zstandard.ZstdCompressor(level=1)
    compressor: zstandard.ZstdCompressor = _local.zstd
    return compressor


def _maybe_compress(data: bytes) -> tuple[bytes, bool]:
    if len(data) < MIN_COMPRESS:
        return data, False
    packed = _compressor().compress(data)
    return (packed, True) if len(packed) < len(data) else (data, False)


class CasClient:
    """Find, upload and download CAS blobs over one channel, with worker threads."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        instance_name: str = "",
        workers: int = 8,
        compress: bool = True,
        timeout: float = 300.0,
    ) -> None:
        self.instance_name = instance_name
        self.timeout = timeout
        self._compress = compress
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._caps = re_grpc.CapabilitiesStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cas")
        self._limits: CasLimits | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> CasClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- capabilities ----
    @property
    def limits(self) -> CasLimits:
        """The server's batch limit and compression support (asked once)."""
        if self._limits is None:
            try:
                caps = self._caps.GetCapabilities(
                    re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name),
                    timeout=self.timeout,
                ).cache_capabilities
            except grpc.RpcError as exc:
                raise rpc_error(exc, "GetCapabilities") from None
            limit = caps.max_batch_total_size_bytes or FALLBACK_BATCH_BYTES
            zstd = re_pb2.Compressor.ZSTD in caps.supported_batch_update_compressors
            self._limits = CasLimits(min(limit, MAX_MESSAGE // 2), zstd and self._compress)
        return self._limits

    @property
    def small_blob_limit(self) -> int:
        """Blobs up to this size travel in batches; larger ones by ByteStream."""
        return min(CHUNK_SIZE, self.limits.max_batch_bytes - PER_ITEM_OVERHEAD)

    # ---- find ----
    def find_missing(self, blobs: Iterable[BlobId]) -> set[BlobId]:
        """The blobs the server lacks (the empty blob is never missing)."""
        wanted = sorted({b for b in blobs if b != EMPTY_BLOB})
        chunks = [
            wanted[i : i + FIND_MISSING_CHUNK] for i in range(0, len(wanted), FIND_MISSING_CHUNK)
        ]
        missing: set[BlobId] = set()
        for found in self._map(self._find_missing_chunk, chunks):
            missing.update(found)
        return missing

    def _find_missing_chunk(self, chunk: list[BlobId]) -> list[BlobId]:
        request = re_pb2.FindMissingBlobsRequest(
            instance_name=self.instance_name,
            blob_digests=[b.to_proto() for b in chunk],
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        try:
            response = self._cas.FindMissingBlobs(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise rpc_error(exc, "FindMissingBlobs") from None
        return [BlobId.from_proto(d) for d in response.missing_blob_digests]

    # ---- upload ----
    def upload_missing(
        self, sources: Mapping[BlobId, BlobSource], progress: ProgressFn | None = None
    ) -> TransferStats:
        """Upload those of sources the server lacks."""
        missing = self.find_missing(sources)
        return self.upload({b: sources[b] for b in missing}, progress)

    def upload(
        self, sources: Mapping[BlobId, BlobSource], progress: ProgressFn | None = None
    ) -> TransferStats:
        """Upload every blob given; file sources are re-checked against their digest."""
        todo = [b for b in sources if b != EMPTY_BLOB]
        small_limit = self.small_blob_limit
        small = sorted((b for b in todo if b.size <= small_limit), key=lambda b: b.size)
        large = [b for b in todo if b.size > small_limit]
        jobs: list[Callable[[], TransferStats]] = []
        for batch in plan_batches(small, self.limits.max_batch_bytes):
            jobs.append(functools.partial(self._upload_batch, batch, sources, progress))
        for blob in large:
            jobs.append(functools.partial(self._upload_stream, blob, sources[blob], progress))
        total = TransferStats()
        for stats in self._map(lambda job: job(), jobs):
            total.add(stats)
        return total

    def _upload_batch(
        self, batch: list[BlobId], sources: Mapping[BlobId, BlobSource], progress: ProgressFn | None
    ) -> TransferStats:
        request = re_pb2.BatchUpdateBlobsRequest(
            instance_name=self.instance_name, digest_function=re_pb2.DigestFunction.SHA256
        )
        wire = 0
        for blob in batch:
            data = _read_source(sources[blob])
            if BlobId.of(data) != blob:
                raise BlobMismatch(f"{sources[blob]!s:.200} changed while it was being saved")
            compressed = False
            if self.limits.zstd:
                data, compressed = _maybe_compress(data)
            wire += len(data)
            request.requests.add(
                digest=blob.to_proto(),
                data=data,
                compressor=re_pb2.Compressor.ZSTD if compressed else re_pb2.Compressor.IDENTITY,
            )
        try:
            response = self._cas.BatchUpdateBlobs(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise rpc_error(exc, "BatchUpdateBlobs") from None
        for entry in response.responses:
            if entry.status.code != 0:
                blob = BlobId.from_proto(entry.digest)
                raise CasError(f"BatchUpdateBlobs: blob {blob}: {entry.status.message}")
        size = sum(b.size for b in batch)
        if progress:
            progress(size)
        return TransferStats(blobs=len(batch), bytes=size, wire_bytes=wire, batch_calls=1)

    def _upload_stream(
        self, blob: BlobId, source: BlobSource, progress: ProgressFn | None
    ) -> TransferStats:
        compressed = self.limits.zstd
        kind = (
            f"compressed-blobs/zstd/{blob.hash}/{blob.size}"
            if compressed
            else f"blobs/{blob.hash}/{blob.size}"
        )
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        resource = f"{prefix}uploads/{uuid.uuid4()}/{kind}"
        state = {"wire": 0, "changed": False}

        def requests() -> Iterator[bs_pb2.WriteRequest]:
            sha = hashlib.sha256()
            size = 0
            packer = zstandard.ZstdCompressor(level=1).compressobj() if compressed else None
            offset = 0
            with _open_source(source) as f:
                while chunk := f.read(CHUNK_SIZE):
                    sha.update(chunk)
                    size += len(chunk)
                    data = packer.compress(chunk) if packer else chunk
                    if progress:
                        progress(len(chunk))
                    if data:
                        yield bs_pb2.WriteRequest(
                            resource_name=resource, write_offset=offset, data=data
                        )
                        offset += len(data)
            if size != blob.size or sha.hexdigest() != blob.hash:
                state["changed"] = True
                return  # no finish_write: the server discards the upload
            tail = packer.flush() if packer else b""
            state["wire"] = offset + len(tail)
            yield bs_pb2.WriteRequest(
                resource_name=resource, write_offset=offset, data=tail, finish_write=True
            )

        try:
            response = self._bytestream.Write(requests(), timeout=self.timeout)
        except grpc.RpcError as exc:
            if state["changed"]:
                raise BlobMismatch(f"{source!s:.200} changed while it was being saved") from None
            raise rpc_error(exc, f"ByteStream.Write {blob}") from None
        if state["changed"]:
            raise BlobMismatch(f"{source!s:.200} changed while it was being saved")
        if response.committed_size not in (-1, blob.size, state["wire"]):
            raise CasError(
                f"ByteStream.Write {blob}: server committed {response.committed_size} bytes"
            )
        return TransferStats(
            blobs=1, bytes=blob.size, wire_bytes=int(state["wire"]), stream_calls=1
        )

    # ---- download ----
    def read_blob(self, blob: BlobId) -> bytes:
        """One whole blob, verified."""
        parts: list[bytes] = []
        self.download([blob], lambda _b, chunks: parts.extend(chunks))
        return b"".join(parts)

    def read_blobs(self, blobs: Iterable[BlobId]) -> dict[BlobId, bytes]:
        """Whole blobs, verified; meant for small ones (e.g. Directory messages)."""
        found: dict[BlobId, bytes] = {}

        def keep(blob: BlobId, chunks: Iterator[bytes]) -> None:
            data = b"".join(chunks)
            with self._lock:
                found[blob] = data

        self.download(blobs, keep)
        return found

    def download(
        self, blobs: Iterable[BlobId], write: BlobWriter, progress: ProgressFn | None = None
    ) -> TransferStats:
        """Call write(blob, chunks) once per distinct blob, from worker threads.

        The chunks are checked against the digest as they are consumed: the
        iterator raises BlobMismatch at the end if the content is wrong, so
        write() must only make the result visible once it is exhausted.
        Missing blobs raise BlobMissing (after the others are written).
        """
        wanted = sorted(set(blobs))
        small_limit = self.small_blob_limit
        small = [b for b in wanted if b.size <= small_limit]
        large = [b for b in wanted if b.size > small_limit]
        jobs: list[Callable[[], tuple[TransferStats, list[BlobId]]]] = []
        for batch in plan_batches(small, self.limits.max_batch_bytes):
            jobs.append(functools.partial(self._read_batch, batch, write, progress))
        for blob in large:
            jobs.append(functools.partial(self._read_stream, blob, write, progress))
        total = TransferStats()
        missing: list[BlobId] = []
        for stats, lost in self._map(lambda job: job(), jobs):
            total.add(stats)
            missing.extend(lost)
        if missing:
            raise BlobMissing(sorted(missing))
        return total

    def _read_batch(
        self, batch: list[BlobId], write: BlobWriter, progress: ProgressFn | None
    ) -> tuple[TransferStats, list[BlobId]]:
        todo = [b for b in batch if b != EMPTY_BLOB]
        stats = TransferStats()
        if EMPTY_BLOB in batch:
            write(EMPTY_BLOB, iter(()))
            stats.blobs += 1
        if not todo:
            return stats, []
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.instance_name,
            digests=[b.to_proto() for b in todo],
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        try:
            response = self._cas.BatchReadBlobs(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise rpc_error(exc, "BatchReadBlobs") from None
        stats.batch_calls = 1
        missing = []
        answered: set[BlobId] = set()
        for entry in response.responses:
            blob = BlobId.from_proto(entry.digest)
            if blob not in todo or blob in answered:
                raise CasError(f"BatchReadBlobs: unexpected blob {blob} in the response")
            answered.add(blob)
            if entry.status.code == grpc.StatusCode.NOT_FOUND.value[0]:
                missing.append(blob)
                continue
            if entry.status.code != 0:
                raise CasError(f"BatchReadBlobs: blob {blob}: {entry.status.message}")
            data = entry.data
            if entry.compressor == re_pb2.Compressor.ZSTD:
                data = _decompress(data, blob)
            if BlobId.of(data) != blob:
                raise BlobMismatch(f"blob {blob} from the server does not match its digest")
            write(blob, iter((data,)))
            stats.blobs += 1
            stats.bytes += blob.size
            stats.wire_bytes += len(entry.data)
            if progress:
                progress(blob.size)
        missing.extend(b for b in todo if b not in answered)
        return stats, missing

    def _read_stream(
        self, blob: BlobId, write: BlobWriter, progress: ProgressFn | None
    ) -> tuple[TransferStats, list[BlobId]]:
        compressed = self.limits.zstd
        kind = (
            f"compressed-blobs/zstd/{blob.hash}/{blob.size}"
            if compressed
            else f"blobs/{blob.hash}/{blob.size}"
        )
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        request = bs_pb2.ReadRequest(resource_name=prefix + kind)
        stats = TransferStats(blobs=1, bytes=blob.size, stream_calls=1)

        def chunks() -> Iterator[bytes]:
            sha = hashlib.sha256()
            size = 0
            unpack = StreamDecompressor(blob.size) if compressed else None
            try:
                for response in self._bytestream.Read(request, timeout=self.timeout):
                    stats.wire_bytes += len(response.data)
                    data = unpack.feed(response.data) if unpack else response.data
                    if not data:
                        continue
                    sha.update(data)
                    size += len(data)
                    if progress:
                        progress(len(data))
                    yield data
            except DigestError as exc:
                raise BlobMismatch(f"blob {blob} from the server: {exc}") from None
            if size != blob.size or sha.hexdigest() != blob.hash:
                raise BlobMismatch(f"blob {blob} from the server does not match its digest")

        try:
            write(blob, chunks())
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.NOT_FOUND:
                return TransferStats(), [blob]
            raise rpc_error(exc, f"ByteStream.Read {blob}") from None
        return stats, []

    # ---- plumbing ----
    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items on the worker threads; the first failure cancels the rest."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        futures: list[Future[R]] = [self._pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()


def _open_source(source: BlobSource) -> BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    return open(source, "rb")


def _decompress(data: bytes, blob: BlobId) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=blob.size)
    except zstandard.ZstdError as exc:
        raise BlobMismatch(f"blob {blob} from the server: zstd: {exc}") from None
