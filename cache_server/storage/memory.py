"""A store in RAM (`--storage memory://`): the disk store's semantics, nothing kept at exit.

Blobs are immutable `bytes`, handed out without copying. CAS blobs and records of
every namespace share one LRU and one size bound, counted in payload bytes.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from slipstream.cache_server.storage.base import (
    BlobWriter,
    Chunk,
    EntrySize,
    RecordInfo,
    Store,
    StoreFull,
    StoreStats,
    encode_record_key,
)
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError, verify

# An LRU key: a blob's hash, or (namespace, key) of a record.
_Key = str | tuple[str, str]


@dataclass(frozen=True, slots=True)
class _Pieces:
    """A streamed blob kept as the pieces it arrived in: joining them would copy
    (and fault in) the whole blob once more at the end of every large upload. A piece
    may be a view into the gRPC message it came in (see _MemoryBlobWriter.write)."""

    parts: tuple[Chunk, ...]
    size: int

    def __len__(self) -> int:
        return self.size


_Payload = bytes | _Pieces


# A record: (value, modified in seconds since the epoch). A plain tuple of
# atomic values, which the cycle collector stops tracking (as the disk store's
# index entries): a million records as small objects would cost every full
# collection tens of ms.
_Record = tuple[bytes, float]


class MemoryStore(Store):
    """CAS and records in this process's memory, bounded by max_size payload bytes."""

    finds_in_memory = True  # find_missing never waits on I/O
    reads_in_memory = True
    works_in_memory = True

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = max_size
        self._lock = threading.Lock()
        # Evictable entries, least recently used first, to their payload.
        self._lru: collections.OrderedDict[_Key, _Payload] = collections.OrderedDict()
        self._records: dict[str, dict[str, _Record]] = {}  # every record, by namespace
        self._bytes_used = 0
        self._uploading = 0  # bytes held by open writers: under the bound too
        self._evictions = 0

    def describe(self) -> str:
        bound = f"up to {self.max_size:,} bytes" if self.max_size is not None else "no size bound"
        with self._lock:
            used = f"{len(self._lru):,} entries, {self._bytes_used:,} bytes"
        return f"memory store ({bound}; {used}; contents are lost at exit)"

    # ---- LRU ----
    def _check_fits(self, size: int) -> None:
        if self.max_size is not None and size > self.max_size:
            raise StoreFull(f"{size:,} bytes do not fit in a store bounded at {self.max_size:,}")

    def _admit_locked(self, key: _Key, data: _Payload) -> None:
        """Insert or replace an evictable entry as the newest, then evict down to the bound."""
        self._drop_locked(key)
        self._lru[key] = data
        self._bytes_used += len(data)
        self._evict_locked(keep=key)

    def _evict_locked(self, keep: _Key | None) -> None:
        """Evict the oldest entries (never keep) until the entries and the open
        writers' bytes are within the bound, or nothing else is left to evict."""
        if self.max_size is None:
            return
        while self._bytes_used + self._uploading > self.max_size and self._lru:
            oldest, payload = next(iter(self._lru.items()))
            if oldest == keep:
                break
            del self._lru[oldest]
            self._bytes_used -= len(payload)
            self._evictions += 1
            if isinstance(oldest, tuple):
                del self._records[oldest[0]][oldest[1]]

    def _hold_upload(self, size: int) -> None:
        """Count size more bytes of an open writer against the bound, evicting to make
        room; StoreFull if the open writers alone would pass it."""
        with self._lock:
            if self.max_size is not None and self._uploading + size > self.max_size:
                raise StoreFull(
                    f"uploads in progress hold {self._uploading:,} bytes of a store bounded"
                    f" at {self.max_size:,}: no room for {size:,} more; retry later"
                )
            self._uploading += size
            self._evict_locked(keep=None)

    def _release_upload(self, size: int) -> None:
        with self._lock:
            self._uploading -= size

    def _lookup(self, sha256: str, size: int | None = None) -> _Payload | None:
        """A stored blob's payload, refreshed in the LRU; None if absent or (given
        a size) stored under another size: a digest is its hash and its size."""
        with self._lock:
            data = self._lru.get(sha256)
            if data is None or (size is not None and len(data) != size):
                return None
            self._lru.move_to_end(sha256)
        return data

    def _drop_locked(self, key: _Key) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._bytes_used -= len(old)

    # ---- CAS ----
    def find_missing(self, blobs: Sequence[BlobId]) -> list[BlobId]:
        missing = []
        lru = self._lru
        with self._lock:
            for b in blobs:
                data = lru.get(b.hash)
                if data is not None and len(data) == b.size:
                    lru.move_to_end(b.hash)
                elif b != EMPTY_BLOB:
                    missing.append(b)
        return missing

    def find_blob(self, sha256: str) -> BlobId | None:
        if sha256 == EMPTY_BLOB.hash:
            return EMPTY_BLOB
        BlobId(sha256, 0)  # validates the hash, as the disk store does
        data = self._lookup(sha256)
        return None if data is None else BlobId(sha256, len(data))

    def get_blob(self, blob: BlobId) -> bytes | None:
        data = self._lookup(blob.hash, blob.size)
        if data is not None:
            return b"".join(data.parts) if isinstance(data, _Pieces) else data
        return b"" if blob == EMPTY_BLOB else None

    def read_blob(
        self, blob: BlobId, offset: int = 0, chunk_size: int = 1 << 20
    ) -> Iterator[Chunk] | None:
        data = self._lookup(blob.hash, blob.size)
        if data is None:
            return iter(()) if blob == EMPTY_BLOB else None
        return _chunks(data.parts if isinstance(data, _Pieces) else (data,), offset, chunk_size)

    def put_blob(self, blob: BlobId, data: bytes) -> None:
        verify(data, blob)
        if blob == EMPTY_BLOB:
            return
        self._check_fits(blob.size)
        self._install(blob, bytes(data))  # no copy when data is already bytes

    def _install(self, blob: BlobId, data: _Payload, uploaded: int = 0) -> None:
        """Store data as blob; uploaded, the bytes an open writer held for it, are
        no longer counted as in progress."""
        with self._lock:
            self._uploading -= uploaded
            if blob.hash in self._lru:
                self._lru.move_to_end(blob.hash)  # same content: just refresh it
            else:
                self._admit_locked(blob.hash, data)

    def open_writer(self, blob: BlobId) -> BlobWriter:
        self._check_fits(blob.size)
        return _MemoryBlobWriter(self, blob)

    # ---- records ----
    def get_record(self, namespace: str, key: str) -> bytes | None:
        encode_record_key(namespace, key)  # the same key rules as every store
        with self._lock:
            record = self._records.get(namespace, {}).get(key)
            if record is None:
                return None
            self._lru.move_to_end((namespace, key))
            return record[0]

    def put_record(self, namespace: str, key: str, value: bytes, *, overwrite: bool = True) -> bool:
        encode_record_key(namespace, key)
        self._check_fits(len(value))
        record = (bytes(value), time.time())
        with self._lock:
            records = self._records.setdefault(namespace, {})
            if not overwrite and key in records:
                return False
            records[key] = record
            self._admit_locked((namespace, key), record[0])
            return True

    def list_records(
        self, namespace: str, prefix: str = "", limit: int | None = None
    ) -> list[RecordInfo]:
        if prefix:
            encode_record_key(namespace, prefix)
        with self._lock:
            records = self._records.get(namespace, {})
            matching = (
                RecordInfo(key, len(value), modified)
                for key, (value, modified) in records.items()
                if key.startswith(prefix)
            )
            found = list(itertools.islice(matching, limit))
        found.sort(key=lambda r: r.key)
        return found

    def delete_record(self, namespace: str, key: str) -> None:
        encode_record_key(namespace, key)
        with self._lock:
            if self._records.get(namespace, {}).pop(key, None) is not None:
                self._drop_locked((namespace, key))

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(len(self._lru), self._bytes_used, self.max_size, self._evictions)

    def largest_entries(self, count: int) -> list[EntrySize]:
        with self._lock:
            entries = [(key, len(payload)) for key, payload in self._lru.items()]
        largest = heapq.nlargest(count, entries, key=lambda item: item[1])
        return [
            EntrySize(*key, size) if isinstance(key, tuple) else EntrySize("cas", key, size)
            for key, size in largest
        ]


def _chunks(parts: tuple[Chunk, ...], offset: int, chunk_size: int) -> Iterator[Chunk]:
    """The bytes of parts from offset on, in slices of at most chunk_size."""
    for part in parts:
        if offset >= len(part):
            offset -= len(part)
            continue
        for start in range(offset, len(part), chunk_size):
            yield part[start : start + chunk_size]
        offset = 0


class _MemoryBlobWriter(BlobWriter):
    """Gathers chunks in a list; commit verifies them and installs them as they are."""

    def __init__(self, store: MemoryStore, blob: BlobId) -> None:
        super().__init__(blob)
        self._store = store
        self._chunks: list[Chunk] | None = []
        self._held = 0  # bytes counted against the store's bound while open

    def write(self, data: Chunk) -> None:
        if self._chunks is None:
            raise DigestError("write after the blob was committed or aborted")
        self._store._hold_upload(len(data))
        try:
            self._take(data)
        except DigestError:
            self._store._release_upload(len(data))
            raise
        self._held += len(data)
        if isinstance(data, memoryview) and not isinstance(data.obj, bytes):
            data = bytes(data)  # a view of a buffer its owner may change
        # A view of a received message is kept, not copied: fresh memory for a copy
        # costs ~0.35 ms per MiB in page faults on this kind of VM, a third of an
        # upload's time on the writer's thread. It pins the chunk and a few bytes more.
        self._chunks.append(data)

    def commit(self) -> None:
        if self._chunks is None:
            raise DigestError("commit after the blob was committed or aborted")
        try:
            self._check_complete()
            if self.blob != EMPTY_BLOB:
                parts = tuple(self._chunks)
                one = parts[0]
                payload = (
                    one
                    if len(parts) == 1 and isinstance(one, bytes)
                    else _Pieces(parts, self.blob.size)
                )
                held, self._held = self._held, 0
                self._store._install(self.blob, payload, uploaded=held)
        finally:
            self.abort()

    def abort(self) -> None:
        self._chunks = None
        held, self._held = self._held, 0
        if held:
            self._store._release_upload(held)
