"""Small helpers for tests that speak REAPI to a real server."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import bytestream_pb2_grpc as bs_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc


def digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def write_requests(
    name: str, data: bytes, chunk: int, start: int = 0, finish: bool = True
) -> list[bs_pb2.WriteRequest]:
    """data[start:] as one ByteStream Write: chunks of `chunk` bytes, the name on the first."""
    requests = []
    offset = start
    while True:
        piece = data[offset : offset + chunk]
        last = offset + len(piece) >= len(data)
        requests.append(
            bs_pb2.WriteRequest(
                resource_name=name if offset == start else "",
                write_offset=offset,
                data=piece,
                finish_write=last and finish,
            )
        )
        offset += len(piece)
        if last:
            return requests


class Reapi:
    """Stubs for every service on one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.cas = re_grpc.ContentAddressableStorageStub(channel)
        self.ac = re_grpc.ActionCacheStub(channel)
        self.caps = re_grpc.CapabilitiesStub(channel)
        self.bytestream = bs_grpc.ByteStreamStub(channel)

    def upload(self, *blobs: bytes, instance: str = "") -> list[re_pb2.Digest]:
        reqs = [re_pb2.BatchUpdateBlobsRequest.Request(digest=digest(b), data=b) for b in blobs]
        resp = self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(instance_name=instance, requests=reqs)
        )
        assert all(r.status.code == 0 for r in resp.responses), resp
        return [r.digest for r in reqs]

    def missing(self, *digests: re_pb2.Digest) -> list[re_pb2.Digest]:
        resp = self.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests))
        return list(resp.missing_blob_digests)

    def write(
        self,
        data: bytes,
        chunk: int = 64 * 1024,
        upload_id: str = "u-1",
        instance: str = "",
        start: int = 0,
        finish: bool = True,
    ) -> bs_pb2.WriteResponse:
        d = digest(data)
        prefix = f"{instance}/" if instance else ""
        name = f"{prefix}uploads/{upload_id}/blobs/{d.hash}/{d.size_bytes}"

        return self.bytestream.Write(iter(write_requests(name, data, chunk, start, finish)))

    def read(self, d: re_pb2.Digest, offset: int = 0, limit: int = 0, instance: str = "") -> bytes:
        prefix = f"{instance}/" if instance else ""
        name = f"{prefix}blobs/{d.hash}/{d.size_bytes}"
        req = bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
        return b"".join(r.data for r in self.bytestream.Read(req))


@dataclass(frozen=True)
class RpcFailure:
    """How a call failed: its status code and one-line message."""

    status: grpc.StatusCode
    message: str

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message


def rpc_error(call: Callable[[], object]) -> RpcFailure:
    """Run a zero-argument call that must fail (draining a stream); return how it failed."""
    try:
        result = call()
        if isinstance(result, Iterable) and not isinstance(result, bytes | str):
            list(result)
    except grpc.RpcError as exc:
        return RpcFailure(exc.code(), exc.details() or "")
    raise AssertionError("the call succeeded but should have failed")
