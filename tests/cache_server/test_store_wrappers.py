"""Stores composed from wrappers: each adds one thing and hands the rest to the store inside."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from slipstream.cache_server.metrics import StoreCollector
from slipstream.cache_server.storage.base import Chunk, StoreUnavailable
from slipstream.cache_server.storage.counting import CountingStore
from slipstream.cache_server.storage.existence_cache import ExistenceCache
from slipstream.cache_server.storage.memory import MemoryStore
from slipstream.core.digests import BlobId, DigestError


class _Spy(MemoryStore):
    """A memory store that records which of its calls were made."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def find_missing(self, blobs: Sequence[BlobId]) -> list[BlobId]:
        self.calls.append("find_missing")
        return super().find_missing(blobs)

    def get_blobs(self, blobs: Sequence[BlobId]) -> list[Chunk | StoreUnavailable | None]:
        self.calls.append("get_blobs")
        return super().get_blobs(blobs)

    def request_counts(self) -> dict[str, int]:
        return {"HeadObject": 3}


def test_counting_counts_each_operation_and_the_metrics_read_it() -> None:
    store = CountingStore(_Spy())
    blob = BlobId.of(b"counted")
    store.put_blob(blob, b"counted")
    assert store.find_missing([blob]) == []
    assert store.get_blobs([blob, BlobId.of(b"absent")]) == [b"counted", None]
    assert store.get_record("ac", "k") is None
    assert store.operation_counts() == {
        "put_blob": 1,
        "find_missing": 1,
        "get_blobs": 1,
        "get_record": 1,
    }
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    value = registry.get_sample_value
    assert value("slipstream_store_operations_total", {"operation": "get_blobs"}) == 1
    assert value("slipstream_s3_requests_total", {"operation": "HeadObject"}) == 3  # forwarded


def test_wrappers_hand_batches_to_the_store_inside() -> None:
    """A batch read stays one call of the store inside (the disk store reads a batch at
    once), through every wrapper."""
    spy = _Spy()
    store = CountingStore(ExistenceCache(spy, max_entries=10, ttl=60.0))
    blobs = [BlobId.of(bytes([i])) for i in range(3)]
    for b in blobs:
        store.put_blob(b, bytes([blobs.index(b)]))
    spy.calls.clear()
    assert store.get_blobs(blobs) == [b"\x00", b"\x01", b"\x02"]
    assert spy.calls == ["get_blobs"]


def test_the_existence_cache_answers_known_blobs_and_forgets_missing_ones() -> None:
    spy = _Spy()
    store = ExistenceCache(spy, max_entries=2, ttl=60.0)
    a, b, c = (BlobId.of(x) for x in (b"a", b"b", b"c"))
    for blob, data in ((a, b"a"), (b, b"b")):
        store.put_blob(blob, data)
    spy.calls.clear()
    assert store.find_missing([a, b]) == []
    assert spy.calls == []  # both known: the store inside is not asked
    with pytest.raises(DigestError):
        store.put_blob(a, b"not a")  # known, yet a wrong upload is refused
    spy.put_blob(c, b"c")
    # c is asked for once, then known; b, the least recently used (a was just looked at),
    # makes room for it, and is asked for again.
    assert store.find_missing([c]) == []
    spy.calls.clear()
    assert store.find_missing([a, c]) == []
    assert spy.calls == []
    assert store.find_missing([b]) == []
    assert spy.calls == ["find_missing"]
    assert store.get_blob(BlobId.of(b"gone")) is None
