"""Under injected S3 faults: acknowledged blobs read back intact, wrong bytes are never served."""

from __future__ import annotations

import contextlib
import os
import random

import pytest

from slipstream.cache_server.storage import s3 as s3mod
from slipstream.cache_server.storage.base import StoreUnavailable
from slipstream.core.digests import BlobId
from tests.s3.conftest import StoreFactory, s3_client
from tests.support.fault_proxy import FaultProxy


def test_faulty_s3_loses_nothing_acknowledged(
    make_store: StoreFactory, proxy: FaultProxy, bucket: str, moto_url: str
) -> None:
    faulty = make_store(proxy.url, timeout=1.0, max_attempts=6)
    clean = make_store()
    proxy.stall_seconds = 1.2
    proxy.rate = 0.25
    rng = random.Random(7)
    blobs = [os.urandom(rng.randrange(1, 50_000)) for _ in range(30)]
    blobs += [os.urandom(s3mod.PART_SIZE + rng.randrange(1, 3 << 20)) for _ in range(2)]
    acknowledged: list[bytes] = []
    for data in blobs:
        blob = BlobId.of(data)
        try:
            if len(data) > s3mod.PART_SIZE:
                writer = faulty.open_writer(blob)
                for i in range(0, len(data), 1 << 20):
                    writer.write(data[i : i + (1 << 20)])
                writer.commit()
            else:
                faulty.put_blob(blob, data)
        except StoreUnavailable:
            continue
        acknowledged.append(data)
    created = {}
    for i in range(10):
        with contextlib.suppress(StoreUnavailable):
            created[f"k{i}"] = faulty.put_record(
                "plans", f"k{i}", f"v{i}".encode(), overwrite=False
            )

    # Reads through the faults: an error is allowed, wrong bytes are not.
    served = 0
    for data in blobs:
        blob = BlobId.of(data)
        try:
            got = faulty.get_blob(blob)
            chunks = faulty.read_blob(blob, 0, 1 << 20)
            streamed = None if chunks is None else b"".join(chunks)
        except StoreUnavailable:
            continue
        assert got in (None, data)
        assert streamed in (None, data)
        served += got is not None
    proxy.rate = 0.0

    assert len(acknowledged) >= len(blobs) - 3, proxy.injected
    assert served > 0
    for data in acknowledged:
        assert clean.get_blob(BlobId.of(data)) == data
    for data in blobs:  # what was not acknowledged is absent or whole, never partial
        assert clean.get_blob(BlobId.of(data)) in (None, data)
    assert all(created.values()), created  # a retried create-if-absent is still ours
    for key in created:
        assert clean.get_record("plans", key) == f"v{key[1:]}".encode()
    assert sum(proxy.injected.values()) > 10, proxy.injected
    # Parts are never orphaned by a failed write; a CreateMultipartUpload whose
    # response was dropped leaves an empty upload, which abort_stale_uploads clears.
    for upload in s3_client(moto_url).list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        parts = s3_client(moto_url).list_parts(
            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
        )
        assert not parts.get("Parts"), upload
    faulty.close()
    clean.close()


@pytest.mark.parametrize("fault", ["truncate", "drop", "503"])
def test_large_streamed_read_survives_cut_connections(
    make_store: StoreFactory, proxy: FaultProxy, fault: str
) -> None:
    window = 4 << 20  # small windows, so the read spans several ranged GETs
    store = make_store(proxy.url, timeout=1.0, max_attempts=6, read_window=window)
    data = os.urandom(2 * window + 777)
    blob = BlobId.of(data)
    writer = store.open_writer(blob)
    writer.write(data)
    writer.commit()
    proxy.faults = (fault,)
    proxy.only_methods = frozenset({"GET"})
    proxy.rate = 0.5
    for offset in (0, 12345):
        chunks = store.read_blob(blob, offset, 1 << 20)
        assert chunks is not None
        assert b"".join(chunks) == data[offset:]
    assert proxy.injected[fault] > 0
    store.close()


def test_a_slow_complete_is_waited_for_not_sent_again(
    make_store: StoreFactory, proxy: FaultProxy
) -> None:
    # S3 answers CompleteMultipartUpload only once the object is assembled (minutes, for a
    # large one). A Complete sent again while the first still assembles races it: moto
    # answers such a one with 500 (a closed part file, a KeyError) until the retries run out.
    store = make_store(proxy.url, timeout=1.0)
    proxy.complete_delay = 2.5
    data = os.urandom(s3mod.PART_SIZE + 1)
    blob = BlobId.of(data)
    writer = store.open_writer(blob)
    writer.write(data)
    writer.commit()
    assert proxy.completes == 1
    assert store.get_blob(blob) == data
