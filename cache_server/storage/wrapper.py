"""A store that hands every call to another: the base of the stores that add one thing.

Each decorator (the existence cache in front of S3, ...) overrides only what it
changes, and is composed from configuration in server.open_store, so no code needs
to know what a store wraps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from slipstream.cache_server.storage.base import (
    BlobRefused,
    BlobWriter,
    Chunk,
    EntrySize,
    RecordInfo,
    Store,
    StoreStats,
    StoreUnavailable,
    X,
    Y,
)
from slipstream.core.digests import BlobId


class StoreWrapper(Store):
    """Every call goes to inner; its guarantees are inner's, plus what a subclass adds."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.reads_in_memory = inner.reads_in_memory
        self.works_in_memory = inner.works_in_memory
        self.in_place_entries = inner.in_place_entries

    @property
    def finds_in_memory(self) -> bool:
        return self.inner.finds_in_memory  # it may change (a disk store's index loads)

    @property
    def writes_in_place(self) -> bool:
        return self.inner.writes_in_place

    def describe(self) -> str:
        return self.inner.describe()

    def start_loading(self, on_loaded: Callable[[], None] | None = None) -> None:
        self.inner.start_loading(on_loaded)

    def find_missing(self, blobs: Sequence[BlobId]) -> list[BlobId]:
        return self.inner.find_missing(blobs)

    def find_blob(self, sha256: str) -> BlobId | None:
        return self.inner.find_blob(sha256)

    def get_blob(self, blob: BlobId) -> bytes | None:
        return self.inner.get_blob(blob)

    def read_blob(
        self, blob: BlobId, offset: int = 0, chunk_size: int = 1 << 20
    ) -> Iterator[Chunk] | None:
        return self.inner.read_blob(blob, offset, chunk_size)

    def put_blob(self, blob: BlobId, data: bytes) -> None:
        self.inner.put_blob(blob, data)

    def put_blobs(
        self, items: Sequence[X], unpack: Callable[[X], tuple[BlobId, bytes]]
    ) -> list[BlobRefused | None]:
        # inner's, which may make a batch durable at once; a wrapper that changes
        # put_blob must change this too (Store.put_blobs goes through put_blob).
        return self.inner.put_blobs(items, unpack)

    def get_blobs(self, blobs: Sequence[BlobId]) -> list[Chunk | StoreUnavailable | None]:
        # inner's, which may read a batch at once; a wrapper that changes get_blob must
        # change this too.
        return self.inner.get_blobs(blobs)

    def open_writer(self, blob: BlobId) -> BlobWriter:
        return self.inner.open_writer(blob)

    def get_record(self, namespace: str, key: str) -> bytes | None:
        return self.inner.get_record(namespace, key)

    def put_record(self, namespace: str, key: str, value: bytes, *, overwrite: bool = True) -> bool:
        return self.inner.put_record(namespace, key, value, overwrite=overwrite)

    def list_records(
        self, namespace: str, prefix: str = "", limit: int | None = None
    ) -> list[RecordInfo]:
        return self.inner.list_records(namespace, prefix, limit)

    def delete_record(self, namespace: str, key: str) -> None:
        self.inner.delete_record(namespace, key)

    def map_blobs(self, fn: Callable[[X], Y], items: Sequence[X]) -> list[Y]:
        return self.inner.map_blobs(fn, items)

    def stats(self) -> StoreStats | None:
        return self.inner.stats()

    def largest_entries(self, count: int) -> list[EntrySize] | None:
        return self.inner.largest_entries(count)

    def request_counts(self) -> dict[str, int]:
        return self.inner.request_counts()

    def operation_counts(self) -> dict[str, int]:
        return self.inner.operation_counts()

    def close(self) -> None:
        self.inner.close()
