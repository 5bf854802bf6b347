"""Every S3 read serves only verified bytes, at any offset (issue 19, item 6), and a
digest is its hash and its size on S3 and the disk tier too (item 7).

Against moto over real HTTP; objects are corrupted directly in the bucket. The
whole-read limit is lowered so "large" blobs (streamed in ranged GETs) stay small.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slipstream.cache_server.storage import s3 as s3mod
from slipstream.cache_server.storage.base import Chunk, Store, StoreUnavailable
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.tiered import TieredStore
from slipstream.core.digests import BlobId
from tests.s3.conftest import StoreFactory, s3_client

WHOLE_READ_LIMIT = 16 << 10
SIZE = 100_000
SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3mod, "WHOLE_READ_LIMIT", WHOLE_READ_LIMIT)


@pytest.fixture
def windowed(make_store: StoreFactory, small_limits: None) -> Iterator[Store]:
    s = make_store(read_window=24 << 10)
    yield s
    s.close()


def _corrupt(moto_url: str, bucket: str, blob: BlobId, data: bytes, at: int) -> None:
    """Replace blob's object in the bucket by data with one byte flipped (same size)."""
    bad = bytearray(data)
    bad[at] ^= 0xFF
    s3_client(moto_url).put_object(
        Bucket=bucket, Key=s3mod.blob_key("cache/", blob), Body=bytes(bad)
    )


def _drain(chunks: Iterator[Chunk]) -> list[Chunk]:
    served: list[Chunk] = []
    with pytest.raises(StoreUnavailable, match="does not match"):
        for chunk in chunks:
            served.append(chunk)
    return served


@pytest.mark.parametrize("corrupt_at", [0, 5, SIZE // 2, SIZE - 1])
def test_corrupt_large_object_is_never_served_whole_at_any_offset(
    windowed: Store, moto_url: str, bucket: str, corrupt_at: int
) -> None:
    data = os.urandom(SIZE)
    blob = BlobId.of(data)
    windowed.put_blob(blob, data)
    _corrupt(moto_url, bucket, blob, data, corrupt_at)
    for offset in (0, 1, 4, 30_000, SIZE - 10, SIZE - 1):
        chunks = windowed.read_blob(blob, offset, 4096)
        assert chunks is not None
        served = _drain(chunks)
        # The last chunk is held back: the read never reaches the blob's end.
        assert sum(map(len, served)) < SIZE - offset, offset


def test_corrupt_small_object_is_not_served_at_an_offset(
    store: Store, moto_url: str, bucket: str
) -> None:
    data = os.urandom(5000)
    blob = BlobId.of(data)
    store.put_blob(blob, data)
    _corrupt(moto_url, bucket, blob, data, 3000)
    for offset in (1, 4):
        assert store.read_blob(blob, offset, 1024) is None  # checked whole: corrupt


@SETTINGS
@given(
    offset=st.integers(min_value=0, max_value=SIZE),
    chunk=st.integers(min_value=1000, max_value=40_000),
)
def test_sound_large_object_reads_exactly_from_any_offset(
    windowed: Store, offset: int, chunk: int
) -> None:
    data = _sound_blob(windowed)
    chunks = windowed.read_blob(BlobId.of(data), offset, chunk)
    assert chunks is not None
    pieces = list(chunks)
    assert b"".join(pieces) == data[offset:]
    assert all(len(p) <= chunk for p in pieces)


_SOUND = os.urandom(SIZE)


def _sound_blob(store: Store) -> bytes:
    blob = BlobId.of(_SOUND)
    if store.find_missing([blob]):
        store.put_blob(blob, _SOUND)
    return _SOUND


@pytest.fixture
def stores(
    make_store: StoreFactory, small_limits: None, tmp_path: pathlib.Path
) -> Iterator[dict[str, Store]]:
    s3 = make_store(read_window=24 << 10)
    tiered = TieredStore(DiskStore(tmp_path / "tier"), make_store(read_window=24 << 10))
    yield {"s3": s3, "tiered": tiered}
    s3.close()
    tiered.close()


@SETTINGS
@given(
    size=st.sampled_from([10, 5000, SIZE]),
    wrong=st.one_of(st.integers(min_value=0, max_value=2 * SIZE), st.just((1 << 63) - 1)),
    data=st.data(),
)
def test_right_hash_wrong_size_is_absent_on_s3_and_the_tier(
    stores: dict[str, Store], size: int, wrong: int, data: st.DataObject
) -> None:
    if wrong == size:
        wrong = 0
    content = os.urandom(size)
    blob = BlobId.of(content)
    bad = BlobId(blob.hash, wrong)
    for name, store in stores.items():
        store.put_blob(blob, content)
        assert store.find_missing([bad, blob]) == [bad], name
        assert store.get_blob(bad) is None, name
        offset = data.draw(st.integers(min_value=0, max_value=min(wrong, 2 * SIZE)))
        assert store.read_blob(bad, offset, 4096) is None, (name, offset)
        # Asking under the wrong size harms nothing.
        assert store.get_blob(blob) == content, name
        chunks = store.read_blob(blob, 1, 4096)
        assert chunks is not None and b"".join(chunks) == content[1:], name
