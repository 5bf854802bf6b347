"""ByteStream Read/Write/QueryWriteStatus over a real socket."""

from __future__ import annotations

import functools
import os
import threading

import grpc
import pytest
import zstandard

from slipstream.cache_server.services.bytestream import FEED_AHEAD
from slipstream.protos import bytestream_pb2 as bs_pb2
from tests.support.reapi import Reapi, digest, rpc_error, write_requests
from tests.support.server_process import ServerProcess


@pytest.fixture
def server(any_store_server: ServerProcess) -> ServerProcess:
    return any_store_server


@pytest.fixture
def api(channel: grpc.Channel) -> Reapi:
    return Reapi(channel)


def test_write_then_read_large_blob_in_pieces(api: Reapi) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    resp = api.write(data, chunk=16 * 1024)
    assert resp.committed_size == len(data)
    d = digest(data)
    assert api.missing(d) == []
    assert api.read(d) == data
    assert api.read(d, offset=1000, limit=5000) == data[1000:6000]
    assert api.read(d, offset=len(data)) == b""
    assert api.read(d, offset=len(data) - 3, limit=100) == data[-3:]


@pytest.mark.parametrize("chunk_mib", [1, 3])
def test_write_then_read_in_chunks_as_large_as_the_store_feed_takes(
    api: Reapi, chunk_mib: int
) -> None:
    # Chunks this large go to the store as views of the received messages, and the
    # upload runs past FEED_AHEAD, so the event loop waits for the writer on the way.
    data = os.urandom(FEED_AHEAD * 3 + 12345)
    assert api.write(data, chunk=chunk_mib << 20).committed_size == len(data)
    d = digest(data)
    assert api.read(d) == data
    start = (chunk_mib << 20) - 100  # across the boundary between two received chunks
    assert api.read(d, offset=start, limit=200) == data[start : start + 200]


def test_multi_segment_instance_name(api: Reapi) -> None:
    data = b"instance scoped bytes" * 100
    api.write(data, instance="team/linux-x86/opt")
    assert api.read(digest(data), instance="team/linux-x86/opt") == data


def test_write_with_wrong_content_is_refused_and_not_readable(api: Reapi) -> None:
    data = b"a" * 100_000
    d = digest(data)
    name = f"uploads/bad-1/blobs/{d.hash}/{d.size_bytes}"
    corrupted = b"b" + data[1:]
    err = rpc_error(
        lambda: api.bytestream.Write(
            iter([bs_pb2.WriteRequest(resource_name=name, data=corrupted, finish_write=True)])
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert api.missing(d) == [d]
    err = rpc_error(lambda: api.read(d))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_write_too_many_or_too_few_bytes(api: Reapi) -> None:
    data = b"short blob"
    d = digest(data)
    name = f"uploads/long-1/blobs/{d.hash}/{d.size_bytes}"
    err = rpc_error(
        lambda: api.bytestream.Write(
            iter([bs_pb2.WriteRequest(resource_name=name, data=data + b"!", finish_write=True)])
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    name = f"uploads/short-1/blobs/{d.hash}/{d.size_bytes}"
    err = rpc_error(
        lambda: api.bytestream.Write(
            iter([bs_pb2.WriteRequest(resource_name=name, data=data[:-1], finish_write=True)])
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert api.missing(d) == [d]


def test_resumable_write(api: Reapi) -> None:
    data = os.urandom(3 * 1024 * 1024)
    d = digest(data)
    name = f"uploads/resume-1/blobs/{d.hash}/{d.size_bytes}"
    half = len(data) // 2
    # First attempt stops without finish_write: the server keeps what it got.
    first_part = [
        bs_pb2.WriteRequest(
            resource_name=name if i == 0 else "", write_offset=i, data=data[i : i + 256 * 1024]
        )
        for i in range(0, half, 256 * 1024)
    ]
    err = rpc_error(lambda: api.bytestream.Write(iter(first_part)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = api.bytestream.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == half and not status.complete
    # A resume at the wrong offset is refused; at the right one it completes.
    err = rpc_error(
        lambda: api.bytestream.Write(
            iter([bs_pb2.WriteRequest(resource_name=name, write_offset=7, data=b"x")])
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = api.bytestream.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    resp = api.bytestream.Write(
        iter(
            [
                bs_pb2.WriteRequest(
                    resource_name=name,
                    write_offset=status.committed_size,
                    data=data[status.committed_size :],
                    finish_write=True,
                )
            ]
        )
    )
    assert resp.committed_size == len(data)
    status = api.bytestream.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert status.complete and status.committed_size == len(data)
    assert api.read(d) == data


def test_query_unknown_upload_reports_nothing_committed(api: Reapi) -> None:
    d = digest(b"never sent")
    name = f"uploads/nobody/blobs/{d.hash}/{d.size_bytes}"
    status = api.bytestream.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == 0 and not status.complete


def test_write_of_existing_blob_finishes_early(api: Reapi) -> None:
    data = os.urandom(200_000)
    api.write(data, upload_id="first")
    d = digest(data)
    name = f"uploads/second/blobs/{d.hash}/{d.size_bytes}"
    sent = []

    def requests():
        for i in range(0, len(data), 10_000):
            sent.append(i)
            yield bs_pb2.WriteRequest(
                resource_name=name if i == 0 else "",
                write_offset=i,
                data=data[i : i + 10_000],
                finish_write=i + 10_000 >= len(data),
            )

    resp = api.bytestream.Write(requests())
    assert resp.committed_size == len(data)


def test_read_errors(api: Reapi) -> None:
    data = b"0123456789"
    (d,) = api.upload(data)
    for offset in (-1, 11):
        err = rpc_error(functools.partial(api.read, d, offset=offset))
        assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    err = rpc_error(lambda: api.read(d, limit=-5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = digest(b"absent")
    assert rpc_error(lambda: api.read(missing)).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "name",
    [
        "blobs/../../etc/passwd/1",
        "../blobs/{h}/10",
        "a/../blobs/{h}/10",
        "blobs/{h}",
        "blobs/{h}/-3",
        "blobs/{h}/10/extra",
        "uploads/blobs/{h}/10",
        "blobs/blake3/{h}/10",
        "compressed-blobs/gzip/{h}/10",
        "",
        "nonsense",
    ],
)
def test_bad_resource_names(api: Reapi, name: str) -> None:
    h = digest(b"0123456789").hash
    name = name.format(h=h)
    err = rpc_error(lambda: list(api.bytestream.Read(bs_pb2.ReadRequest(resource_name=name))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details() and "\n" not in err.details()
    if name.endswith("/extra"):
        return  # trailing segments are optional metadata on uploads
    write_name = name.replace("blobs/", "uploads/x/blobs/", 1) if "blobs/" in name else name
    err = rpc_error(
        lambda: api.bytestream.Write(
            iter(
                [
                    bs_pb2.WriteRequest(
                        resource_name=write_name, data=b"0123456789", finish_write=True
                    )
                ]
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (write_name, err.details())


def test_compressed_write_and_read(api: Reapi) -> None:
    data = b"zstd over bytestream " * 50_000
    d = digest(data)
    compressed = zstandard.ZstdCompressor().compress(data)
    name = f"uploads/z1/compressed-blobs/zstd/{d.hash}/{d.size_bytes}"
    resp = api.bytestream.Write(iter(write_requests(name, compressed, 100_000)))
    assert resp.committed_size in (len(compressed), -1)
    assert api.read(d) == data
    read = bs_pb2.ReadRequest(resource_name=f"compressed-blobs/zstd/{d.hash}/{d.size_bytes}")
    frames = b"".join(r.data for r in api.bytestream.Read(read))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frames) == data
    read.read_offset = 1000
    frames = b"".join(r.data for r in api.bytestream.Read(read))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frames) == data[1000:]
    read.read_limit = 10
    assert (
        rpc_error(lambda: list(api.bytestream.Read(read))).code()
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_compressed_write_of_a_zip_bomb_is_refused(api: Reapi) -> None:
    small = b"tiny"
    d = digest(small)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 10_000_000)
    name = f"uploads/bomb/compressed-blobs/zstd/{d.hash}/{d.size_bytes}"
    err = rpc_error(
        lambda: api.bytestream.Write(
            iter([bs_pb2.WriteRequest(resource_name=name, data=bomb, finish_write=True)])
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert api.missing(d) == [d]


def test_concurrent_writers_and_readers_of_one_blob(api: Reapi) -> None:
    data = os.urandom(2 * 1024 * 1024)
    d = digest(data)
    errors: list[BaseException] = []
    reads: list[bytes] = []

    def writer(i: int) -> None:
        try:
            api.write(data, upload_id=f"w{i}", chunk=128 * 1024)
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        for _ in range(20):
            try:
                reads.append(api.read(d))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == data for r in reads)  # never a partial or mixed blob
    assert api.read(d) == data
