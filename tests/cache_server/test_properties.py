"""Property tests: CAS round-trips, ByteStream offsets and chunking, resource names."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slipstream.cache_server.resource_names import (
    RESERVED_SEGMENTS,
    parse_read_name,
    parse_write_name,
)
from slipstream.core.digests import BlobId, DigestError
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.reapi import Reapi, digest

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def api(shared_channel: grpc.Channel) -> Reapi:
    return Reapi(shared_channel)


@SETTINGS
@given(blobs=st.lists(st.binary(max_size=4096), max_size=8))
def test_batch_round_trip(api: Reapi, blobs: list[bytes]) -> None:
    digests = api.upload(*blobs) if blobs else []
    assert api.missing(*digests) == []
    resp = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
    assert [r.data for r in resp.responses] == blobs


@SETTINGS
@given(
    data=st.binary(min_size=0, max_size=300_000),
    chunks=st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=20),
    uid=st.uuids(),
)
def test_bytestream_write_any_chunking_round_trips(
    api: Reapi, data: bytes, chunks: list[int], uid: object
) -> None:
    d = digest(data)
    name = f"uploads/{uid}/blobs/{d.hash}/{d.size_bytes}"
    reqs: list[bs_pb2.WriteRequest] = []
    offset, i = 0, 0
    while offset < len(data) or not reqs:
        size = chunks[i % len(chunks)]
        piece = data[offset : offset + size]
        reqs.append(
            bs_pb2.WriteRequest(
                resource_name=name if not reqs else "",
                write_offset=offset,
                data=piece,
                finish_write=offset + len(piece) >= len(data),
            )
        )
        offset += len(piece)
        i += 1
    resp = api.bytestream.Write(iter(reqs))
    assert resp.committed_size == len(data)
    assert api.read(d) == data


_READ_BLOB = bytes(range(256)) * 1200 + b"tail"


@SETTINGS
@given(offset=st.integers(0, len(_READ_BLOB)), limit=st.integers(0, len(_READ_BLOB) + 10))
def test_bytestream_read_offsets_match_slices(api: Reapi, offset: int, limit: int) -> None:
    d = digest(_READ_BLOB)
    if api.missing(d):
        api.write(_READ_BLOB, upload_id="read-blob")
    expected = _READ_BLOB[offset : offset + limit] if limit else _READ_BLOB[offset:]
    assert api.read(d, offset=offset, limit=limit) == expected


_SEGMENT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12
).filter(lambda s: s not in (".", "..") and s not in RESERVED_SEGMENTS)


@settings(max_examples=300, deadline=None)
@given(
    instance=st.lists(_SEGMENT, max_size=4),
    data=st.binary(max_size=64),
    upload_id=st.uuids(),
    metadata=st.lists(_SEGMENT, max_size=3),
)
def test_resource_names_parse_back(
    instance: list[str], data: bytes, upload_id: object, metadata: list[str]
) -> None:
    blob = BlobId.of(data)
    prefix = "".join(f"{s}/" for s in instance)
    read = parse_read_name(f"{prefix}blobs/{blob.hash}/{blob.size}")
    assert (read.instance, read.blob, read.compressed) == ("/".join(instance), blob, False)
    tail = "".join(f"/{s}" for s in metadata)
    write = parse_write_name(
        f"{prefix}uploads/{upload_id}/compressed-blobs/zstd/{blob.hash}/{blob.size}{tail}"
    )
    assert (write.instance, write.blob, write.compressed, write.upload_id) == (
        "/".join(instance),
        blob,
        True,
        str(upload_id),
    )


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=200))
def test_arbitrary_resource_names_never_crash_the_parser(name: str) -> None:
    for parse in (parse_read_name, parse_write_name):
        try:
            parsed = parse(name)
        except DigestError:
            continue
        assert ".." not in parsed.instance.split("/")


_VALID_HASH = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@st.composite
def _hashlike(draw: st.DrawFn) -> str:
    """Mostly valid hashes; the rest spoiled in one way a client could get wrong."""
    h = draw(_VALID_HASH)
    spoil = draw(st.sampled_from(["none", "none", "char", "short", "long"]))
    if spoil == "char":
        i = draw(st.integers(0, 63))
        return h[:i] + draw(st.sampled_from("ABCDEFG g\u00e9\u0130-")) + h[i + 1 :]
    return {"none": h, "short": h[:-1], "long": h + "0"}[spoil]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_hashlike(), st.integers(min_value=-2, max_value=1 << 40)), max_size=6))
def test_bulk_digest_check_agrees_with_one_by_one(pairs: list[tuple[str, int]]) -> None:
    """BlobId.from_protos checks in bulk; it must accept and refuse exactly what BlobId does."""
    digests = [re_pb2.Digest(hash=h, size_bytes=n) for h, n in pairs]
    try:
        expected: list[BlobId] | str = [BlobId(h, n) for h, n in pairs]
    except DigestError as exc:
        expected = str(exc)
    try:
        got: list[BlobId] | str = BlobId.from_protos(digests)
    except DigestError as exc:
        got = str(exc)
    assert got == expected
    if isinstance(got, list):
        assert all(type(b) is BlobId for b in got)
