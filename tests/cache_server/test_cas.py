"""ContentAddressableStorage and Capabilities over a real socket."""

from __future__ import annotations

import functools
import hashlib
import os

import grpc
import pytest
import zstandard

from slipstream.cache_server.services.common import MAX_BATCH_TOTAL_SIZE
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.reapi import Reapi, digest, rpc_error
from tests.support.server_process import ServerProcess

EMPTY = digest(b"")


@pytest.fixture
def server(any_store_server: ServerProcess) -> ServerProcess:
    return any_store_server


@pytest.fixture
def api(channel: grpc.Channel) -> Reapi:
    return Reapi(channel)


def test_capabilities_cover_bazel4_to_current(api: Reapi) -> None:
    caps = api.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    cache = caps.cache_capabilities
    assert list(cache.digest_functions) == [re_pb2.DigestFunction.SHA256]
    assert cache.action_cache_update_capabilities.update_enabled
    assert 0 < cache.max_batch_total_size_bytes < 4 * 1024 * 1024
    assert cache.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.ALLOWED
    low, high = caps.low_api_version, caps.high_api_version
    assert (low.major, low.minor) <= (2, 0) and (high.major, high.minor) >= (2, 3)


def test_upload_find_read(api: Reapi) -> None:
    blobs = [b"alpha", b"beta" * 1000, bytes(range(256))]
    digests = api.upload(*blobs)
    absent = digest(b"never uploaded")
    assert api.missing(*digests, absent) == [absent]
    resp = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[*digests, absent]))
    got = {r.digest.hash: (r.status.code, r.data) for r in resp.responses}
    for blob, d in zip(blobs, digests, strict=True):
        assert got[d.hash] == (0, blob)
    assert got[absent.hash][0] == grpc.StatusCode.NOT_FOUND.value[0]


def test_empty_blob_is_always_present(api: Reapi) -> None:
    assert api.missing(EMPTY) == []
    resp = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[EMPTY]))
    assert resp.responses[0].status.code == 0 and resp.responses[0].data == b""
    assert api.read(EMPTY) == b""


def test_wrong_hash_or_size_is_refused_and_nothing_stored(api: Reapi) -> None:
    data = b"the real content"
    wrong_hash = re_pb2.Digest(hash=hashlib.sha256(b"other").hexdigest(), size_bytes=len(data))
    wrong_size = re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data) + 1)
    resp = api.cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=wrong_hash, data=data),
                re_pb2.BatchUpdateBlobsRequest.Request(digest=wrong_size, data=data),
            ]
        )
    )
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.status.code for r in resp.responses] == [invalid, invalid]
    assert all(r.status.message for r in resp.responses)
    assert api.missing(wrong_hash, wrong_size) == [wrong_hash, wrong_size]


@pytest.mark.parametrize(
    ("hash_", "size"),
    [("abc", 3), ("A" * 64, 3), ("g" * 64, 3), ("0" * 63, 1), ("0" * 64, -1)],
)
def test_malformed_digests_are_invalid_argument(api: Reapi, hash_: str, size: int) -> None:
    bad = re_pb2.Digest(hash=hash_, size_bytes=size)
    for call in (
        lambda: api.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[bad])),
        lambda: api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[bad])),
        lambda: api.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=bad, data=b"abc")]
            )
        ),
    ):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "\n" not in err.details() and err.details()


def test_unknown_digest_function_is_refused(api: Reapi) -> None:
    err = rpc_error(
        lambda: api.cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(
                blob_digests=[EMPTY], digest_function=re_pb2.DigestFunction.BLAKE3
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BLAKE3" in err.details()


def test_oversized_batches_are_refused(api: Reapi) -> None:
    big = b"x" * (MAX_BATCH_TOTAL_SIZE // 2 + 1)
    other = b"y" * len(big)
    req = re_pb2.BatchUpdateBlobsRequest(
        requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=digest(b), data=b) for b in (big, other)
        ]
    )
    err = rpc_error(lambda: api.cas.BatchUpdateBlobs(req))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert api.missing(digest(big)) == [digest(big)]
    fake = re_pb2.Digest(hash="0" * 64, size_bytes=MAX_BATCH_TOTAL_SIZE + 1)
    err = rpc_error(lambda: api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[fake])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_zstd_compressed_batch_update(api: Reapi) -> None:
    data = b"compress me " * 500
    req = re_pb2.BatchUpdateBlobsRequest.Request(
        digest=digest(data),
        data=zstandard.ZstdCompressor().compress(data),
        compressor=re_pb2.Compressor.ZSTD,
    )
    resp = api.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[req]))
    assert resp.responses[0].status.code == 0
    assert api.read(digest(data)) == data
    bad = re_pb2.BatchUpdateBlobsRequest.Request(
        digest=digest(b"other"), data=b"not zstd", compressor=re_pb2.Compressor.ZSTD
    )
    resp = api.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[bad]))
    assert resp.responses[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_garbage_protobuf_gets_a_status_and_server_keeps_serving(
    api: Reapi, channel: grpc.Channel
) -> None:
    raw = channel.unary_unary(
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    err = rpc_error(lambda: raw(b"\xff\xff\xff\xff garbage"))
    assert err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    assert api.missing(EMPTY) == []


def _dir(files: dict[str, bytes] = {}, dirs: dict[str, re_pb2.Digest] = {}) -> re_pb2.Directory:  # noqa: B006
    return re_pb2.Directory(
        files=[re_pb2.FileNode(name=n, digest=digest(d)) for n, d in sorted(files.items())],
        directories=[re_pb2.DirectoryNode(name=n, digest=d) for n, d in sorted(dirs.items())],
    )


def test_get_tree_walks_and_pages(api: Reapi) -> None:
    leaves = [_dir({f"f{i}": f"content {i}".encode()}) for i in range(5)]
    leaf_digests = api.upload(*(d.SerializeToString() for d in leaves))
    mid = _dir(dirs={f"d{i}": d for i, d in enumerate(leaf_digests)})
    (mid_digest,) = api.upload(mid.SerializeToString())
    # The same subtree twice: it is listed once.
    root = _dir({"top": b"top"}, {"a": mid_digest, "b": mid_digest})
    (root_digest,) = api.upload(root.SerializeToString())

    whole = [
        d
        for resp in api.cas.GetTree(re_pb2.GetTreeRequest(root_digest=root_digest))
        for d in resp.directories
    ]
    assert whole[0] == root
    assert len(whole) == 1 + 1 + 5

    paged: list[re_pb2.Directory] = []
    token = ""
    pages = 0
    while True:
        resps = list(
            api.cas.GetTree(
                re_pb2.GetTreeRequest(root_digest=root_digest, page_size=3, page_token=token)
            )
        )
        pages += 1
        for r in resps:
            paged.extend(r.directories)
        token = resps[-1].next_page_token
        if not token:
            break
    assert pages == 3
    assert paged == whole


def test_get_tree_errors(api: Reapi) -> None:
    missing_root = digest(b"no such directory")
    err = rpc_error(lambda: api.cas.GetTree(re_pb2.GetTreeRequest(root_digest=missing_root)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    (root,) = api.upload(_dir({"x": b"x"}).SerializeToString())
    err = rpc_error(
        lambda: api.cas.GetTree(re_pb2.GetTreeRequest(root_digest=root, page_token="bogus"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    (not_a_dir,) = api.upload(b"\xff\xff not a directory")
    err = rpc_error(lambda: api.cas.GetTree(re_pb2.GetTreeRequest(root_digest=not_a_dir)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_instance_names_with_path_tricks_are_refused(api: Reapi) -> None:
    for instance in ("../x", "a//b", "a/./b"):
        request = re_pb2.FindMissingBlobsRequest(instance_name=instance, blob_digests=[EMPTY])
        err = rpc_error(functools.partial(api.cas.FindMissingBlobs, request))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_batch_read_compresses_when_the_client_accepts_zstd(api: Reapi) -> None:
    text, noise = b"very compressible " * 1000, os.urandom(4000)
    d_text, d_noise, d_tiny = api.upload(text, noise, b"tiny")
    resp = api.cas.BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(
            digests=[d_text, d_noise, d_tiny], acceptable_compressors=[re_pb2.Compressor.ZSTD]
        )
    )
    by_hash = {r.digest.hash: r for r in resp.responses}
    packed = by_hash[d_text.hash]
    assert packed.compressor == re_pb2.Compressor.ZSTD and len(packed.data) < len(text)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(packed.data) == text
    # Incompressible or tiny blobs come back as they are.
    assert by_hash[d_noise.hash].compressor == re_pb2.Compressor.IDENTITY
    assert by_hash[d_noise.hash].data == noise
    assert by_hash[d_tiny.hash].data == b"tiny"
    plain = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[d_text]))
    assert plain.responses[0].compressor == re_pb2.Compressor.IDENTITY
