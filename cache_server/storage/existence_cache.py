"""Remembers which blobs a slow store holds, so finding them again costs no request.

In front of S3: FindMissingBlobs (and the completeness check of every action-result
hit) would otherwise send one HEAD per digest per call. A blob this store saw
written, found or read is remembered for `ttl` seconds (keep it well below the
bucket's expiry age: the bucket may drop an object without telling), at most
`max_entries` of them, least recently used first out. A blob found missing or
corrupt on a read is forgotten at once.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from slipstream.cache_server.storage.base import (
    BlobRefused,
    BlobWriter,
    Chunk,
    Store,
    StoreUnavailable,
    X,
)
from slipstream.cache_server.storage.wrapper import StoreWrapper
from slipstream.core.digests import EMPTY_BLOB, BlobId, verify


class KnownPresent:
    """A bounded, expiring set of blobs known to be in the store."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        self._max = max_entries
        self._ttl = ttl
        self._lock = threading.Lock()
        self._expiry: collections.OrderedDict[BlobId, float] = collections.OrderedDict()

    def __contains__(self, blob: BlobId) -> bool:
        with self._lock:
            expiry = self._expiry.get(blob)
            if expiry is None:
                return False
            if expiry < time.monotonic():
                del self._expiry[blob]
                return False
            self._expiry.move_to_end(blob)
            return True

    def add(self, blob: BlobId) -> None:
        with self._lock:
            self._expiry[blob] = time.monotonic() + self._ttl
            self._expiry.move_to_end(blob)
            while len(self._expiry) > self._max:
                self._expiry.popitem(last=False)

    def discard(self, blob: BlobId) -> None:
        with self._lock:
            self._expiry.pop(blob, None)

    def __len__(self) -> int:
        return len(self._expiry)


class ExistenceCache(StoreWrapper):
    """inner, with the blobs known present answered from memory."""

    def __init__(self, inner: Store, max_entries: int, ttl: float) -> None:
        super().__init__(inner)
        self.known = KnownPresent(max_entries, ttl)

    def find_missing(self, blobs: Sequence[BlobId]) -> list[BlobId]:
        unknown = list(dict.fromkeys(b for b in blobs if b != EMPTY_BLOB and b not in self.known))
        missing = set(self.inner.find_missing(unknown)) if unknown else set()
        for blob in unknown:
            if blob not in missing:
                self.known.add(blob)
        return [b for b in blobs if b in missing]

    def find_blob(self, sha256: str) -> BlobId | None:
        blob = self.inner.find_blob(sha256)
        if blob is not None:
            self.known.add(blob)
        return blob

    def get_blob(self, blob: BlobId) -> bytes | None:
        data = self.inner.get_blob(blob)
        if data is None:
            self.known.discard(blob)
        else:
            self.known.add(blob)
        return data

    def get_blobs(self, blobs: Sequence[BlobId]) -> list[Chunk | StoreUnavailable | None]:
        got = self.inner.get_blobs(blobs)
        for blob, data in zip(blobs, got, strict=True):
            if data is None:
                self.known.discard(blob)
            elif not isinstance(data, StoreUnavailable):
                self.known.add(blob)
        return got

    def read_blob(
        self, blob: BlobId, offset: int = 0, chunk_size: int = 1 << 20
    ) -> Iterator[Chunk] | None:
        chunks = self.inner.read_blob(blob, offset, chunk_size)
        if chunks is None:
            self.known.discard(blob)
            return None
        return self._forget_on_failure(blob, chunks)

    def _forget_on_failure(self, blob: BlobId, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        try:
            yield from chunks
        except BaseException:
            self.known.discard(blob)  # corrupt or gone: ask the store next time
            raise
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                close()

    def put_blob(self, blob: BlobId, data: bytes) -> None:
        if blob in self.known:
            verify(data, blob)  # nothing to store, but a wrong upload is still refused
            return
        self.inner.put_blob(blob, data)
        self.known.add(blob)

    def put_blobs(
        self, items: Sequence[X], unpack: Callable[[X], tuple[BlobId, bytes]]
    ) -> list[BlobRefused | None]:
        """Each blob through put_blob above, in inner's map_blobs (parallel on S3)."""
        return Store.put_blobs(self, items, unpack)

    def open_writer(self, blob: BlobId) -> BlobWriter:
        return _RememberingWriter(self.inner.open_writer(blob), self.known)


class _RememberingWriter(BlobWriter):
    """inner's writer; a committed blob is known present."""

    def __init__(self, inner: BlobWriter, known: KnownPresent) -> None:
        super().__init__(inner.blob)
        self._inner = inner
        self._known = known

    def write(self, data: Chunk) -> None:
        self._inner.write(data)
        self.committed_size = self._inner.committed_size

    def commit(self) -> None:
        self._inner.commit()
        self._known.add(self.blob)

    def abort(self) -> None:
        self._inner.abort()
