"""The thinnest REAPI cache a Python gRPC server can be: the benchmarks' ceiling.

    python -m benchmarks.reference_server --port N [--aio]

Dicts in RAM, no digest checks, no hashing, no limits, no metrics: what is left is
gRPC's own cost of moving the workload's messages in this language on this machine.
It runs in its own process on grpcio's threaded server, as BuildGrid does, or with
--aio on grpc.aio (one event loop, as Slipstream's server), the same work either way. A row where
this server is not 2x BuildGrid is a row where a Python server doing real work has little
room to be; bench_peers measures it in the same run to say which rows those are. Not a
cache: it trusts every digest it is sent, never evicts, keeps nothing at exit, and serves
blobs written through ByteStream through ByteStream only (kept as the chunks they came in).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc

from slipstream.cache_server.server import keep_freed_memory
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import bytestream_pb2_grpc as bs_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc
from slipstream.protos import status_pb2

_OK = status_pb2.Status(code=grpc.StatusCode.OK.value[0])
_MISSING = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0])
_CHUNK = 1 << 20


class _Store:
    """The dicts both servers keep, and the work of each call on them (no I/O)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.streamed: dict[str, list[bytes]] = {}  # big blobs, as the chunks they came in
        self.results: dict[str, bytes] = {}  # action results, serialized

    def find_missing(self, request: Any) -> re_pb2.FindMissingBlobsResponse:
        blobs = self.blobs
        return re_pb2.FindMissingBlobsResponse(
            missing_blob_digests=[d for d in request.blob_digests if d.hash not in blobs]
        )

    def batch_update(self, request: Any) -> re_pb2.BatchUpdateBlobsResponse:
        response = re_pb2.BatchUpdateBlobsResponse()
        add = response.responses.add
        for r in request.requests:
            self.blobs[r.digest.hash] = r.data
            add(digest=r.digest, status=_OK)
        return response

    def batch_read(self, request: Any) -> re_pb2.BatchReadBlobsResponse:
        response = re_pb2.BatchReadBlobsResponse()
        add = response.responses.add
        for d in request.digests:
            data = self.blobs.get(d.hash)
            if data is None:
                add(digest=d, status=_MISSING)
            else:
                add(digest=d, data=data, status=_OK)
        return response

    def action_result(self, request: Any) -> re_pb2.ActionResult | None:
        raw = self.results.get(request.action_digest.hash)
        return None if raw is None else re_pb2.ActionResult.FromString(raw)

    def update_action_result(self, request: Any) -> re_pb2.ActionResult:
        result: re_pb2.ActionResult = request.action_result
        self.results[request.action_digest.hash] = result.SerializeToString()
        return result

    def read_chunks(self, request: Any) -> list[bytes] | None:
        """The chunks a ByteStream Read sends; None for a blob it does not have."""
        parts = request.resource_name.split("/")
        chunks = self.streamed.get(parts[parts.index("blobs") + 1])
        if chunks is None:
            data = self.blobs.get(parts[parts.index("blobs") + 1])
            if data is None:
                return None
            chunks = [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)]
        if request.read_offset:  # not in the benchmark: the simple way
            data = b"".join(chunks)[request.read_offset :]
            chunks = [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)]
        return chunks

    def written(self, name: str, chunks: list[bytes]) -> bs_pb2.WriteResponse:
        parts = name.split("/")
        self.streamed[parts[parts.index("blobs") + 1]] = chunks  # kept as they came
        return bs_pb2.WriteResponse(committed_size=sum(map(len, chunks)))


# ---- on grpcio's threaded server ----


class _Cas(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def FindMissingBlobs(self, request: Any, context: Any) -> re_pb2.FindMissingBlobsResponse:
        return self.store.find_missing(request)

    def BatchUpdateBlobs(self, request: Any, context: Any) -> re_pb2.BatchUpdateBlobsResponse:
        return self.store.batch_update(request)

    def GetTree(self, request: Any, context: Any) -> Iterator[re_pb2.GetTreeResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the benchmark")
        raise AssertionError("abort raises")

    def BatchReadBlobs(self, request: Any, context: Any) -> re_pb2.BatchReadBlobsResponse:
        return self.store.batch_read(request)


class _ActionCache(re_grpc.ActionCacheServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def GetActionResult(self, request: Any, context: Any) -> re_pb2.ActionResult:
        result = self.store.action_result(request)
        if result is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such action result")
            raise AssertionError("abort raises")
        return result

    def UpdateActionResult(self, request: Any, context: Any) -> re_pb2.ActionResult:
        return self.store.update_action_result(request)


class _ByteStream(bs_grpc.ByteStreamServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Read(self, request: Any, context: Any) -> Iterator[bs_pb2.ReadResponse]:
        chunks = self.store.read_chunks(request)
        if chunks is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
            raise AssertionError("abort raises")
        for chunk in chunks:
            yield bs_pb2.ReadResponse(data=chunk)

    def Write(self, request_iterator: Any, context: Any) -> bs_pb2.WriteResponse:
        chunks: list[bytes] = []
        name = ""
        for request in request_iterator:
            name = name or request.resource_name
            chunks.append(request.data)
        return self.store.written(name, chunks)

    def QueryWriteStatus(self, request: Any, context: Any) -> bs_pb2.QueryWriteStatusResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the benchmark")
        raise AssertionError("abort raises")


class _Capabilities(re_grpc.CapabilitiesServicer):
    def GetCapabilities(self, request: Any, context: Any) -> re_pb2.ServerCapabilities:
        return re_pb2.ServerCapabilities()


# ---- on grpc.aio: the same work, each handler a coroutine that never waits ----


class _AioCas(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    async def FindMissingBlobs(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> re_pb2.FindMissingBlobsResponse:
        return self.store.find_missing(request)

    async def BatchUpdateBlobs(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> re_pb2.BatchUpdateBlobsResponse:
        return self.store.batch_update(request)

    async def GetTree(self, request: Any, context: Any) -> None:  # type: ignore[override]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the benchmark")

    async def BatchReadBlobs(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> re_pb2.BatchReadBlobsResponse:
        return self.store.batch_read(request)


class _AioActionCache(re_grpc.ActionCacheServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    async def GetActionResult(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> re_pb2.ActionResult:
        result = self.store.action_result(request)
        if result is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such action result")
            raise AssertionError("abort raises")
        return result

    async def UpdateActionResult(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> re_pb2.ActionResult:
        return self.store.update_action_result(request)


class _AioByteStream(bs_grpc.ByteStreamServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    async def Read(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> AsyncIterator[bs_pb2.ReadResponse]:
        chunks = self.store.read_chunks(request)
        if chunks is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
            raise AssertionError("abort raises")
        for chunk in chunks:
            yield bs_pb2.ReadResponse(data=chunk)

    async def Write(  # type: ignore[override]
        self, request_iterator: Any, context: Any
    ) -> bs_pb2.WriteResponse:
        chunks: list[bytes] = []
        name = ""
        async for request in request_iterator:
            name = name or request.resource_name
            chunks.append(request.data)
        return self.store.written(name, chunks)

    async def QueryWriteStatus(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> bs_pb2.QueryWriteStatusResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the benchmark")
        raise AssertionError("abort raises")


class _AioCapabilities(re_grpc.CapabilitiesServicer):
    async def GetCapabilities(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> re_pb2.ServerCapabilities:
        return re_pb2.ServerCapabilities()


_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def serve(port: int, threads: int = 16) -> None:
    keep_freed_memory()  # as Slipstream's server does, or this would be no ceiling
    server = grpc.server(futures.ThreadPoolExecutor(threads), options=_OPTIONS)
    store = _Store()
    re_grpc.add_ContentAddressableStorageServicer_to_server(_Cas(store), server)
    re_grpc.add_ActionCacheServicer_to_server(_ActionCache(store), server)
    re_grpc.add_CapabilitiesServicer_to_server(_Capabilities(), server)
    bs_grpc.add_ByteStreamServicer_to_server(_ByteStream(store), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"reference server on 127.0.0.1:{bound}", flush=True)
    threading.Event().wait()  # until the process is terminated


async def serve_aio(port: int) -> None:
    """The same server on grpc.aio."""
    keep_freed_memory()
    server = grpc.aio.server(options=_OPTIONS)
    store = _Store()
    re_grpc.add_ContentAddressableStorageServicer_to_server(_AioCas(store), server)
    re_grpc.add_ActionCacheServicer_to_server(_AioActionCache(store), server)
    re_grpc.add_CapabilitiesServicer_to_server(_AioCapabilities(), server)
    bs_grpc.add_ByteStreamServicer_to_server(_AioByteStream(store), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"reference server (aio) on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()  # until the process is terminated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aio", action="store_true", help="serve on grpc.aio")
    args = parser.parse_args(argv)
    if args.aio:
        asyncio.run(serve_aio(args.port))
    else:
        serve(args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
