"""ContentAddressableStorage: find, batch-write, batch-read blobs and walk trees."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from slipstream.cache_server.services.common import (
    MAX_BATCH_TOTAL_SIZE,
    Backend,
    RpcError,
    add_servicer,
    blob_from_request,
    blobs_from_request,
    check_function,
    grpc_errors,
    instance_ok,
    status_of,
)
from slipstream.cache_server.storage.base import StoreUnavailable
from slipstream.cache_server.wire import (
    BatchReadResponseEncoder,
    EncodedBatchRead,
    batch_read_message,
)
from slipstream.core.compression import compress_blob, decompress_exact
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc
from slipstream.protos import status_pb2

DEFAULT_TREE_PAGE = 1000
COMPRESS_MIN = 512  # smaller blobs gain too little from zstd to be worth it
_OK = status_pb2.Status(code=grpc.StatusCode.OK.value[0])


def add_to_server(service: CasService, server: grpc.aio.Server) -> None:
    """Register the CAS, with BatchReadBlobs answering encoded (cache_server.wire)."""
    add_servicer(
        server,
        service,
        re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"],
        encoders={"BatchReadBlobs": batch_read_message},
    )


def _status(code: int, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


def _rpc_status(exc: BaseException) -> status_pb2.Status:
    code, message = status_of(exc)
    return _status(code.value[0], message)


class CasService(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @grpc_errors
    async def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> re_pb2.FindMissingBlobsResponse:
        instance_ok(request.instance_name)
        check_function(request.digest_function)
        blobs = blobs_from_request(request.blob_digests, "blob_digests")
        missing = await self.backend.find_missing(blobs)
        response = re_pb2.FindMissingBlobsResponse()
        add = response.missing_blob_digests.add
        for blob in missing:
            add(hash=blob.hash, size_bytes=blob.size)
        return response

    @grpc_errors
    async def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> re_pb2.BatchUpdateBlobsResponse:
        instance_ok(request.instance_name)
        check_function(request.digest_function)
        requests = request.requests
        payloads = [r.data for r in requests]  # each access copies: take them once
        total = sum(map(len, payloads))
        _check_batch_size(total)
        # Digests are checked up front, so one malformed digest fails the call
        # rather than leaving a half-applied batch behind it.
        blobs = blobs_from_request([r.digest for r in requests], "requests.digest")
        # zstd payloads expand to what their digests say, and no further (see
        # decompress_exact): the batch limit holds for that too.
        _check_batch_size(sum(blob.size for blob in blobs))
        items = [
            (blob, payload, r.compressor)
            for blob, payload, r in zip(blobs, payloads, requests, strict=True)
        ]
        # The work is hashing (and unpacking) what the digests name: zstd payloads
        # count for less than that.
        hashed = sum(blob.size for blob in blobs)
        statuses = await self.backend.run_store(
            self._store_batch, items, gil_free_bytes=hashed, entries=len(items), writes=True
        )
        response = re_pb2.BatchUpdateBlobsResponse()
        add = response.responses.add
        for blob, status in zip(blobs, statuses, strict=True):
            entry = add()  # filled in place, as in _read_batch
            entry.digest.hash = blob.hash
            entry.digest.size_bytes = blob.size
            entry.status.CopyFrom(status)
        return response

    def _store_batch(self, items: list[tuple[BlobId, bytes, int]]) -> list[status_pb2.Status]:
        def unpack(item: tuple[BlobId, bytes, int]) -> tuple[BlobId, bytes]:
            blob, payload, compressor = item
            if compressor == re_pb2.Compressor.ZSTD:
                return blob, decompress_exact(payload, blob.size)
            if compressor == re_pb2.Compressor.IDENTITY:
                return blob, payload
            raise DigestError(f"compressor {compressor} is not supported")

        # The store verifies hash and size, and makes the batch durable at once.
        refused = self.backend.store.put_blobs(items, unpack)
        return [_OK if error is None else _rpc_status(error) for error in refused]

    @grpc_errors
    async def BatchReadBlobs(  # type: ignore[override]  # answers encoded (add_to_server)
        self, request: re_pb2.BatchReadBlobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> EncodedBatchRead:
        instance_ok(request.instance_name)
        check_function(request.digest_function)
        blobs = blobs_from_request(request.digests, "digests")
        total = sum(b.size for b in blobs)
        _check_batch_size(total)
        zstd = re_pb2.Compressor.ZSTD in request.acceptable_compressors
        return await self.backend.run_store(
            self._read_batch, blobs, zstd, gil_free_bytes=total if zstd else 0, entries=len(blobs)
        )

    def _read_batch(self, blobs: list[BlobId], zstd: bool) -> EncodedBatchRead:
        """The BatchReadBlobsResponse, encoded: each blob's data is copied once."""
        encoder = BatchReadResponseEncoder()
        for blob, data in zip(blobs, self.backend.store.get_blobs(blobs), strict=True):
            if data is None:
                status = _status(grpc.StatusCode.NOT_FOUND.value[0], f"blob {blob} not found")
                encoder.add_status(blob.hash, blob.size, status.SerializeToString())
            elif isinstance(data, StoreUnavailable):
                encoder.add_status(blob.hash, blob.size, _rpc_status(data).SerializeToString())
            else:
                compressor = re_pb2.Compressor.IDENTITY
                if zstd and len(data) >= COMPRESS_MIN:
                    compressed = compress_blob(data)
                    if len(compressed) < len(data):
                        data, compressor = compressed, re_pb2.Compressor.ZSTD
                encoder.add_data(blob.hash, blob.size, data, compressor)
        return encoder.encode()

    @grpc_errors
    async def GetTree(
        self, request: re_pb2.GetTreeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[re_pb2.GetTreeResponse]:
        instance_ok(request.instance_name)
        check_function(request.digest_function)
        root = blob_from_request(request.root_digest, "root_digest")
        if request.page_size < 0:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        start = _parse_page_token(request.page_token)
        directories = await self.backend.run(collect_tree, self.backend.store, root)
        if directories is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"root directory {root} not found")
        if start > len(directories):
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "page_token is past the end of the tree"
            )
        if request.page_size:
            end = min(start + request.page_size, len(directories))
            token = str(end) if end < len(directories) else ""
            yield re_pb2.GetTreeResponse(directories=directories[start:end], next_page_token=token)
            return
        # No page size: stream the whole tree in messages of bounded size.
        while True:
            end = min(start + DEFAULT_TREE_PAGE, len(directories))
            yield re_pb2.GetTreeResponse(directories=directories[start:end])
            start = end
            if start >= len(directories):
                return


def _check_batch_size(total: int) -> None:
    if total > MAX_BATCH_TOTAL_SIZE:
        raise RpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"batch of {total:,} bytes exceeds max_batch_total_size_bytes {MAX_BATCH_TOTAL_SIZE:,}",
        )


def _parse_page_token(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or len(token) > 12:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"page_token {token[:40]!r} is not valid")
    return int(token)


def collect_tree(store: Any, root: BlobId) -> list[re_pb2.Directory] | None:
    """Every directory reachable from root, breadth-first, each once; None if root is missing.

    Subtrees missing from the CAS are left out, as the protocol allows.
    """
    seen = {root}
    queue = [root]
    found: list[re_pb2.Directory] = []
    for position, digest in enumerate(queue):
        data = store.get_blob(digest) if digest != EMPTY_BLOB else b""
        if data is None:
            if position == 0:
                return None
            continue
        directory = re_pb2.Directory()
        try:
            directory.ParseFromString(data)
        except Exception:
            raise DigestError(f"blob {digest} is not a Directory message") from None
        found.append(directory)
        for child in directory.directories:
            try:
                child_id = BlobId.from_proto(child.digest)
            except DigestError:
                continue
            if child_id not in seen:
                seen.add(child_id)
                queue.append(child_id)
    return found
