"""Store.largest_entries: the disk and memory stores answer from their index with each
entry's content size (blobs by hash, records by namespace and key); a tiered store answers
with its disk tier's; a store that does not know (S3 behind the existence cache) says so."""

from __future__ import annotations

import pathlib

import pytest

from slipstream.cache_server.storage.base import EntrySize, Store
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.existence_cache import ExistenceCache
from slipstream.cache_server.storage.memory import MemoryStore
from slipstream.cache_server.storage.tiered import TieredStore
from slipstream.cache_server.storage.wrapper import StoreWrapper
from slipstream.core.digests import BlobId


def fill(store: Store) -> list[EntrySize]:
    """Blobs and records of several sizes; the entries expected, largest first."""
    expected = []
    for size in (5_000, 70, 120_000):
        data = bytes([size % 251]) * size
        blob = BlobId.of(data)
        store.put_blob(blob, data)
        expected.append(EntrySize("cas", blob.hash, size))
    store.put_record("timings", "suite/a key with spaces & ünïcode", b"r" * 9_000)
    expected.append(EntrySize("timings", "suite/a key with spaces & ünïcode", 9_000))
    return sorted(expected, key=lambda e: -e.size)


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_the_largest_entries_come_with_their_sizes(tmp_path: pathlib.Path, kind: str) -> None:
    store: Store = DiskStore(tmp_path / "store") if kind == "disk" else MemoryStore()
    expected = fill(store)
    assert store.largest_entries(3) == expected[:3]
    assert store.largest_entries(100) == expected
    store.close()
    if kind == "disk":  # the index rebuilt from the files says the same
        again = DiskStore(tmp_path / "store")
        assert again.largest_entries(100) == expected
        again.close()


class _Remote(StoreWrapper):
    """Stands in for S3: a store that keeps no sizes in memory (Store's default answer)."""

    def largest_entries(self, count: int) -> list[EntrySize] | None:
        return Store.largest_entries(self, count)


def test_a_tiered_store_answers_with_its_disk_tier_and_a_remote_store_does_not_know(
    tmp_path: pathlib.Path,
) -> None:
    remote = ExistenceCache(_Remote(MemoryStore()), max_entries=10, ttl=60.0)
    assert remote.largest_entries(5) is None
    tiered = TieredStore(DiskStore(tmp_path / "disk"), remote)
    expected = [e for e in fill(tiered) if e.namespace == "cas"]  # records stay remote
    assert tiered.largest_entries(5) == expected
    tiered.close()
