"""Store.find_blob (a blob by hash alone, for the HTTP cache) on every backend."""

from __future__ import annotations

import hashlib
import os
import pathlib

import pytest

from slipstream.cache_server.storage.base import Store
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.tiered import TieredStore
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError
from tests.s3.conftest import StoreFactory


def _check(store: Store) -> None:
    data = os.urandom(2500)
    blob = BlobId.of(data)
    assert store.find_blob(blob.hash) is None
    store.put_blob(blob, data)
    assert store.find_blob(blob.hash) == blob  # the size comes back too
    assert store.find_blob(EMPTY_BLOB.hash) == EMPTY_BLOB
    assert store.find_blob(hashlib.sha256(b"absent").hexdigest()) is None
    with pytest.raises(DigestError):
        store.find_blob("not-a-hash")


def test_disk(tmp_path: pathlib.Path) -> None:
    _check(DiskStore(tmp_path / "disk"))


def test_s3_and_tier(make_store: StoreFactory, tmp_path: pathlib.Path) -> None:
    _check(make_store())
    s3 = make_store()
    tier = TieredStore(DiskStore(tmp_path / "disk", 64 << 20), s3)
    _check(tier)
    # A blob only in S3 (another replica wrote it) is found through the tier as well.
    data = os.urandom(700)
    make_store().put_blob(BlobId.of(data), data)
    assert tier.find_blob(BlobId.of(data).hash) == BlobId.of(data)
