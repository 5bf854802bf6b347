"""zstd payloads expand to their digest's declared size and no further: a small bomb
costs the server no more memory than the blob it claims to be (issue 19, item 2)."""

from __future__ import annotations

import hashlib

import grpc
import pytest
import zstandard

from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.proc_stats import peak_rss_bytes
from tests.support.reapi import Reapi, rpc_error
from tests.support.server_process import ServerProcess

BOMB_EXPANDS_TO = 256 << 20
# Well under the bomb's size, well over what the server needs for the call.
PEAK_GROWTH_LIMIT = 64 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """zstd data of a few KiB that expands to BOMB_EXPANDS_TO zero bytes (made in 1 MiB
    steps: the test never holds the expanded data)."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(1 << 20)
    parts = [compressor.compress(zeros) for _ in range(BOMB_EXPANDS_TO >> 20)]
    parts.append(compressor.flush())
    data = b"".join(parts)
    assert len(data) < 64 << 10
    return data


def peak_rss(server: ServerProcess) -> int:
    """The server's peak resident memory so far (VmHWM), in bytes."""
    assert server.proc is not None
    return peak_rss_bytes(server.proc.pid)


def _claimed(size: int) -> re_pb2.Digest:
    data = b"c" * size
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=size)


def test_batch_update_bomb_is_refused_within_the_declared_size(
    server: ServerProcess, bomb: bytes
) -> None:
    api = Reapi(server.channel())
    before = peak_rss(server)
    for size in (1000, 3 << 20):
        claimed = _claimed(size)
        resp = api.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(
                        digest=claimed, data=bomb, compressor=re_pb2.Compressor.ZSTD
                    )
                ]
            ),
            timeout=30,
        )
        status = resp.responses[0].status
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], status
        assert "expands past the blob size" in status.message
        assert api.missing(claimed) == [claimed]
    growth = peak_rss(server) - before
    assert growth < PEAK_GROWTH_LIMIT, f"peak RSS grew by {growth:,} bytes"


def test_batch_whose_declared_sizes_pass_the_limit_is_refused(
    server: ServerProcess, bomb: bytes
) -> None:
    api = Reapi(server.channel())
    claimed = re_pb2.Digest(hash="ab" * 32, size_bytes=1 << 30)
    request = re_pb2.BatchUpdateBlobsRequest(
        requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(
                digest=claimed, data=bomb, compressor=re_pb2.Compressor.ZSTD
            )
        ]
    )
    failure = rpc_error(lambda: api.cas.BatchUpdateBlobs(request, timeout=30))
    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT, failure
    assert "max_batch_total_size_bytes" in failure.details()


def test_compressed_bytestream_bomb_is_refused_within_the_declared_size(
    server: ServerProcess, bomb: bytes
) -> None:
    api = Reapi(server.channel())
    before = peak_rss(server)
    claimed = _claimed(2 << 20)
    name = f"uploads/bomb/compressed-blobs/zstd/{claimed.hash}/{claimed.size_bytes}"
    requests = [bs_pb2.WriteRequest(resource_name=name, data=bomb, finish_write=True)]
    failure = rpc_error(lambda: api.bytestream.Write(iter(requests), timeout=30))
    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT, failure
    growth = peak_rss(server) - before
    assert growth < PEAK_GROWTH_LIMIT, f"peak RSS grew by {growth:,} bytes"
    assert api.missing(claimed) == [claimed]
