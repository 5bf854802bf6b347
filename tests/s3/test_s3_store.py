"""The S3 store and the disk tier against moto over real HTTP (boto3 unpatched)."""

from __future__ import annotations

import hashlib
import os
import pathlib

import pytest

from slipstream.cache_server.storage import s3 as s3mod
from slipstream.cache_server.storage.base import RecordKeyError, Store, StoreUnavailable
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.s3 import parse_s3_url, windows
from slipstream.cache_server.storage.tiered import TieredStore
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError
from tests.s3.conftest import StoreFactory, s3_client
from tests.support.fault_proxy import FaultProxy


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b/")
    for bad in ("bucket", "s3://", "s3://b", "s3://bu cket/x", "s3://bucket/a/../b"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)
    assert windows(0, 10, 4) == [(0, 3), (4, 7), (8, 9)]


def test_blob_round_trip_and_find_missing_counts(store: Store) -> None:
    blobs = [os.urandom(100 + i) for i in range(40)]
    ids = [BlobId.of(b) for b in blobs]
    before = store.request_counts()
    assert store.find_missing([*ids, EMPTY_BLOB]) == ids
    assert delta(before, store.request_counts()) == {"HeadObject": 40}  # one parallel HEAD each
    for b, i in zip(blobs, ids, strict=True):
        store.put_blob(i, b)
    before = store.request_counts()
    assert store.find_missing(ids) == []
    assert store.find_missing(ids) == []
    assert delta(before, store.request_counts()) == {}  # known present: no S3 requests at all
    assert store.get_blob(ids[3]) == blobs[3]
    assert store.get_blob(EMPTY_BLOB) == b""
    assert store.get_blob(BlobId.of(b"absent")) is None


def test_find_missing_of_blobs_another_replica_wrote(make_store: StoreFactory) -> None:
    writer, reader = make_store(), make_store()
    ids = []
    for i in range(20):
        data = f"blob {i}".encode()
        ids.append(BlobId.of(data))
        writer.put_blob(ids[-1], data)
    before = reader.request_counts()
    assert reader.find_missing(ids) == []  # 20 HEADs, in parallel
    assert reader.find_missing(ids) == []  # none
    assert delta(before, reader.request_counts()) == {"HeadObject": 20}
    writer.close()
    reader.close()


def test_put_blob_refuses_wrong_content(store: Store) -> None:
    blob = BlobId.of(b"right")
    with pytest.raises(DigestError):
        store.put_blob(blob, b"wrong")
    assert store.find_missing([blob]) == [blob]


def test_streamed_multipart_write_and_ranged_read(store: Store, bucket: str, moto_url: str) -> None:
    data = os.urandom(3 * s3mod.PART_SIZE + 12345)
    blob = BlobId.of(data)
    before = store.request_counts()
    writer = store.open_writer(blob)
    for i in range(0, len(data), 1 << 20):
        writer.write(data[i : i + (1 << 20)])
    assert store.find_missing([blob]) == [blob]  # nothing visible before commit
    writer.commit()
    counts = delta(before, store.request_counts())
    assert counts["UploadPart"] == 4 and counts["CompleteMultipartUpload"] == 1
    assert store.find_missing([blob]) == []
    chunks = store.read_blob(blob, 0, 1 << 20)
    assert chunks is not None
    assert b"".join(chunks) == data
    tail = store.read_blob(blob, len(data) - 100_000)
    assert tail is not None and b"".join(tail) == data[-100_000:]
    middle = store.read_blob(blob, 5_000_001, 65536)
    assert middle is not None and b"".join(middle) == data[5_000_001:]
    assert not s3_client(moto_url).list_multipart_uploads(Bucket=bucket).get("Uploads")


def _uploads(moto_url: str, bucket: str) -> list[object]:
    return list(s3_client(moto_url).list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_failed_or_aborted_multipart_leaves_nothing(
    store: Store, bucket: str, moto_url: str
) -> None:
    data = os.urandom(2 * s3mod.PART_SIZE + 1)
    lying = BlobId(hashlib.sha256(b"something else").hexdigest(), len(data))
    writer = store.open_writer(lying)
    writer.write(data)
    assert len(_uploads(moto_url, bucket)) == 1  # parts went up as they filled
    with pytest.raises(DigestError):
        writer.commit()
    assert _uploads(moto_url, bucket) == []
    assert store.find_missing([lying]) == [lying]

    blob = BlobId.of(data)
    writer = store.open_writer(blob)
    writer.write(data[: s3mod.PART_SIZE + 10])
    writer.abort()
    writer.abort()
    assert _uploads(moto_url, bucket) == []
    assert store.find_missing([blob]) == [blob]
    with pytest.raises(DigestError):
        store.open_writer(blob).write(data + b"x")


def test_stale_uploads_are_aborted(make_store: StoreFactory, bucket: str, moto_url: str) -> None:
    store = make_store.raw()
    data = os.urandom(s3mod.PART_SIZE + 1)
    writer = store.open_writer(BlobId.of(data))
    writer.write(data)  # as if the server died here
    assert len(_uploads(moto_url, bucket)) == 1
    # moto reports every upload as begun in 2010, so only the cut-off of 0 is telling here.
    assert store.abort_stale_uploads(older_than=0) == 1
    assert _uploads(moto_url, bucket) == []


def test_wrong_content_in_the_bucket_is_never_served(
    store: Store, bucket: str, moto_url: str
) -> None:
    client = s3_client(moto_url)
    small = b"small blob"
    small_id = BlobId.of(small)
    client.put_object(Bucket=bucket, Key=s3mod.blob_key("cache/", small_id), Body=b"small blxb")
    assert store.get_blob(small_id) is None  # checked, found corrupt, deleted
    assert store.find_missing([small_id]) == [small_id]

    big = os.urandom(s3mod.WHOLE_READ_LIMIT + 4096)
    big_id = BlobId.of(big)
    bad = bytearray(big)
    bad[-1] ^= 1
    client.put_object(Bucket=bucket, Key=s3mod.blob_key("cache/", big_id), Body=bytes(bad))
    chunks = store.read_blob(big_id, 0, 1 << 20)
    assert chunks is not None
    received = []
    with pytest.raises(StoreUnavailable, match="does not match"):
        for c in chunks:
            received.append(c)
    assert sum(map(len, received)) < len(big)  # the last chunk is held back

    client.put_object(Bucket=bucket, Key=s3mod.blob_key("cache/", big_id), Body=big[:-1])
    assert store.find_missing([big_id]) == [big_id]  # wrong size counts as missing


def test_records(store: Store, make_store: StoreFactory) -> None:
    assert store.get_record("ac", "a/1") is None
    assert store.put_record("ac", "a/1", b"one")
    assert store.put_record("ac", "a/1", b"uno")
    assert store.get_record("ac", "a/1") == b"uno"
    assert not store.put_record("ac", "a/1", b"other", overwrite=False)
    assert store.get_record("ac", "a/1") == b"uno"
    assert store.put_record("plans", "p", b"first", overwrite=False)
    other = make_store()
    assert not other.put_record("plans", "p", b"second", overwrite=False)
    assert other.get_record("plans", "p") == b"first"
    for key in ("a/2", "a/10", "b/1", "a%x", "a.b"):
        store.put_record("timings", key, key.encode())
    assert [r.key for r in store.list_records("timings", "a")] == ["a%x", "a.b", "a/10", "a/2"]
    assert [r.key for r in store.list_records("timings", "a/")] == ["a/10", "a/2"]
    for key in (".", ".."):  # keys, not a directory and its parent
        store.put_record("layers", key, key.encode())
        assert store.get_record("layers", key) == key.encode()
    assert [r.key for r in store.list_records("layers", ".")] == [".", ".."]
    for key in (".", ".."):
        store.delete_record("layers", key)
    limited = [r.key for r in store.list_records("timings", "a", 3)]
    assert len(limited) == 3 and limited == sorted(limited)
    assert set(limited) <= {"a%x", "a.b", "a/10", "a/2"}
    info = store.list_records("timings", "b/")[0]
    assert info.size == 3 and info.modified > 0
    store.delete_record("timings", "b/1")
    store.delete_record("timings", "b/1")
    assert store.list_records("timings", "b") == []
    assert store.list_records("layers") == []
    with pytest.raises(RecordKeyError):
        store.put_record("Bad NS", "k", b"")
    other.close()


def test_unreachable_bucket_is_unavailable_then_recovers(
    make_store: StoreFactory, proxy: FaultProxy
) -> None:
    store = make_store(proxy.url, max_attempts=2, timeout=1.0)
    blob = BlobId.of(b"x")
    proxy.down = True
    with pytest.raises(StoreUnavailable, match=r"S3 bucket s3://.*cannot check a blob"):
        store.find_missing([blob])
    with pytest.raises(StoreUnavailable):
        store.put_blob(blob, b"x")
    with pytest.raises(StoreUnavailable):
        store.get_record("ac", "k")
    proxy.down = False
    store.put_blob(blob, b"x")
    assert store.get_blob(blob) == b"x"
    store.close()


def test_tier_reads_fill_disk_and_writes_go_through(
    make_store: StoreFactory, tmp_path: pathlib.Path
) -> None:
    s3 = make_store()
    tier = TieredStore(DiskStore(tmp_path / "disk", 64 << 20), s3)
    other = make_store()  # another replica, straight on S3
    data = os.urandom(1000)
    blob = BlobId.of(data)
    tier.put_blob(blob, data)
    assert other.get_blob(blob) == data  # write-through: in S3 once acknowledged
    assert tier.fast.get_blob(blob) == data

    remote = os.urandom(3000)
    remote_id = BlobId.of(remote)
    other.put_blob(remote_id, remote)
    before = s3.request_counts()
    assert tier.find_missing([blob, remote_id]) == []
    assert tier.get_blob(remote_id) == remote  # from S3, filling the disk
    assert tier.get_blob(remote_id) == remote  # from disk
    assert tier.find_missing([blob, remote_id]) == []
    assert delta(before, s3.request_counts()) == {"HeadObject": 1, "GetObject": 1}

    big = os.urandom(s3mod.WHOLE_READ_LIMIT + 5)
    big_id = BlobId.of(big)
    w = other.open_writer(big_id)
    w.write(big)
    w.commit()
    chunks = tier.read_blob(big_id)
    assert chunks is not None and b"".join(chunks) == big  # streamed from S3, teed to disk
    assert tier.fast.find_missing([big_id]) == []

    streamed = os.urandom(s3mod.PART_SIZE * 2)
    streamed_id = BlobId.of(streamed)
    w = tier.open_writer(streamed_id)
    w.write(streamed)
    w.commit()
    assert other.get_blob(streamed_id) == streamed
    assert tier.fast.get_blob(streamed_id) == streamed
    assert tier.put_record("ac", "k", b"v") and other.get_record("ac", "k") == b"v"
    tier.close()
    other.close()


def test_a_batch_goes_to_s3_then_to_the_disk_tier_in_one(
    make_store: StoreFactory, tmp_path: pathlib.Path
) -> None:
    s3 = make_store()
    tier = TieredStore(DiskStore(tmp_path / "disk", 64 << 20), s3)
    blobs = [os.urandom(500) for _ in range(20)]
    wrong = (BlobId.of(b"claimed"), b"other bytes")
    refused = tier.put_blobs([(BlobId.of(b), b) for b in blobs] + [wrong], lambda pair: pair)
    assert refused[:-1] == [None] * 20 and isinstance(refused[-1], DigestError)
    ids = [BlobId.of(b) for b in blobs]
    assert tier.fast.find_missing(ids) == []  # the disk copies
    before = s3.request_counts()
    assert s3.find_missing([*ids, wrong[0]]) == [wrong[0]]
    assert delta(before, s3.request_counts()) == {"HeadObject": 1}  # the stored ones are known
    assert make_store().get_blob(ids[7]) == blobs[7]  # in S3 for other replicas
    tier.close()
