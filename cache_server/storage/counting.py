"""Counts a store's calls by operation, for the metrics (slipstream_store_operations_total).

The outermost wrapper of every store the server opens (server.open_store), so the
counts are what the services asked of the store, whatever the backend: a call that
the existence cache or the disk tier answers counts here all the same.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator, Sequence

from slipstream.cache_server.storage.base import (
    BlobRefused,
    BlobWriter,
    Chunk,
    RecordInfo,
    Store,
    StoreUnavailable,
    X,
    Y,
)
from slipstream.cache_server.storage.wrapper import StoreWrapper
from slipstream.core.digests import BlobId


class CountingStore(StoreWrapper):
    """inner, with each call counted under its operation's name."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def _count(self, operation: str) -> None:
        with self._lock:
            self._counts[operation] += 1

    def operation_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def find_missing(self, blobs: Sequence[BlobId]) -> list[BlobId]:
        self._count("find_missing")
        return self.inner.find_missing(blobs)

    def find_blob(self, sha256: str) -> BlobId | None:
        self._count("find_blob")
        return self.inner.find_blob(sha256)

    def get_blob(self, blob: BlobId) -> bytes | None:
        self._count("get_blob")
        return self.inner.get_blob(blob)

    def read_blob(
        self, blob: BlobId, offset: int = 0, chunk_size: int = 1 << 20
    ) -> Iterator[Chunk] | None:
        self._count("read_blob")
        return self.inner.read_blob(blob, offset, chunk_size)

    def put_blob(self, blob: BlobId, data: bytes) -> None:
        self._count("put_blob")
        self.inner.put_blob(blob, data)

    def get_blobs(self, blobs: Sequence[BlobId]) -> list[Chunk | StoreUnavailable | None]:
        self._count("get_blobs")
        return self.inner.get_blobs(blobs)

    def put_blobs(
        self, items: Sequence[X], unpack: Callable[[X], tuple[BlobId, bytes]]
    ) -> list[BlobRefused | None]:
        self._count("put_blobs")
        return self.inner.put_blobs(items, unpack)

    def open_writer(self, blob: BlobId) -> BlobWriter:
        self._count("open_writer")
        return self.inner.open_writer(blob)

    def get_record(self, namespace: str, key: str) -> bytes | None:
        self._count("get_record")
        return self.inner.get_record(namespace, key)

    def put_record(self, namespace: str, key: str, value: bytes, *, overwrite: bool = True) -> bool:
        self._count("put_record")
        return self.inner.put_record(namespace, key, value, overwrite=overwrite)

    def list_records(
        self, namespace: str, prefix: str = "", limit: int | None = None
    ) -> list[RecordInfo]:
        self._count("list_records")
        return self.inner.list_records(namespace, prefix, limit)

    def delete_record(self, namespace: str, key: str) -> None:
        self._count("delete_record")
        self.inner.delete_record(namespace, key)

    def map_blobs(self, fn: Callable[[X], Y], items: Sequence[X]) -> list[Y]:
        return self.inner.map_blobs(fn, items)
