"""A local disk store in front of a shared one (S3): fast reads, write-through.

Reads try the disk first, then the shared store, and fill the disk on the way.
Writes are acknowledged only once the shared store holds them; the disk copy
follows and its failure (full, broken) never fails the write. Records go
straight to the shared store, so every replica sees the same values.

Write-through copies on the disk are synced as the disk store syncs its writes
(before the write is acknowledged; see storage/disk.py); copies filled on a
read are not, since the shared store holds them and a copy lost to a power cut
is only fetched again (every file carries a checksum, so a torn one reads as
missing).

There is no write-behind mode: acknowledging before the shared store has a
blob would lose it if this machine went away, and other replicas would not
see it in the meantime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

from slipstream.cache_server.storage.base import (
    BlobRefused,
    BlobWriter,
    Chunk,
    EntrySize,
    RecordInfo,
    Store,
    StoreFull,
    StoreStats,
    X,
    Y,
)
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError

log = logging.getLogger(__name__)


class TieredStore(Store):
    def __init__(self, fast: DiskStore, shared: Store) -> None:
        self.fast = fast
        self.shared = shared

    def describe(self) -> str:
        return f"{self.fast.describe()}, in front of the {self.shared.describe()}"

    def start_loading(self, on_loaded: Callable[[], None] | None = None) -> None:
        self.shared.start_loading()
        self.fast.start_loading(on_loaded)

    # ---- CAS ----
    def find_missing(self, blobs: Sequence[BlobId]) -> list[BlobId]:
        not_local = self.fast.find_missing(blobs)
        return self.shared.find_missing(not_local) if not_local else []

    def find_blob(self, sha256: str) -> BlobId | None:
        return self.fast.find_blob(sha256) or self.shared.find_blob(sha256)

    def map_blobs(self, fn: Callable[[X], Y], items: Sequence[X]) -> list[Y]:
        return self.shared.map_blobs(fn, items)

    def get_blob(self, blob: BlobId) -> bytes | None:
        data = self.fast.get_blob(blob)
        if data is not None:
            return data
        data = self.shared.get_blob(blob)
        if data is not None:
            self._fill(blob, data)
        return data

    def _fill(self, blob: BlobId, data: bytes, *, written: bool = False) -> None:
        """Copy a blob to the disk, synced if it is a write (not a read) going through."""
        try:
            if written:
                self.fast.put_blob(blob, data)
            else:
                self.fast.fill_blob(blob, data)
        except (OSError, StoreFull, DigestError) as exc:
            log.warning("disk cache not filled with %s: %s", blob, exc)

    def read_blob(
        self, blob: BlobId, offset: int = 0, chunk_size: int = 1 << 20
    ) -> Iterator[Chunk] | None:
        chunks: Iterator[Chunk] | None = self.fast.read_blob(blob, offset, chunk_size)
        if chunks is not None:
            return chunks
        chunks = self.shared.read_blob(blob, offset, chunk_size)
        if chunks is None or offset != 0 or blob == EMPTY_BLOB:
            return chunks
        try:
            writer = self.fast.open_fill_writer(blob)
        except (OSError, StoreFull) as exc:
            log.info("disk cache not filled with %s: %s", blob, exc)
            return chunks
        return _tee(chunks, writer)

    def put_blob(self, blob: BlobId, data: bytes) -> None:
        self.shared.put_blob(blob, data)
        self._fill(blob, data, written=True)

    def put_blobs(
        self, items: Sequence[X], unpack: Callable[[X], tuple[BlobId, bytes]]
    ) -> list[BlobRefused | None]:
        """The shared store takes the batch; the disk then copies, as one synced batch,
        the blobs it stored."""
        unpacked: list[tuple[BlobId, bytes] | None] = [None] * len(items)

        def keep(numbered: tuple[int, X]) -> tuple[BlobId, bytes]:
            unpacked[numbered[0]] = found = unpack(numbered[1])
            return found

        refused = self.shared.put_blobs(list(enumerate(items)), keep)
        stored = [pair for pair, error in zip(unpacked, refused, strict=True) if not error and pair]
        try:
            copies = self.fast.put_blobs(stored, lambda pair: pair)
        except OSError as exc:
            log.warning("disk cache not filled with a batch of %d blobs: %s", len(stored), exc)
        else:
            for (blob, _), error in zip(stored, copies, strict=True):
                if error is not None:
                    log.warning("disk cache not filled with %s: %s", blob, error)
        return refused

    def open_writer(self, blob: BlobId) -> BlobWriter:
        shared = self.shared.open_writer(blob)
        try:
            local: BlobWriter | None = self.fast.open_writer(blob)
        except (OSError, StoreFull):
            local = None
        return _TieredWriter(blob, shared, local)

    # ---- records ----
    def get_record(self, namespace: str, key: str) -> bytes | None:
        return self.shared.get_record(namespace, key)

    def put_record(self, namespace: str, key: str, value: bytes, *, overwrite: bool = True) -> bool:
        return self.shared.put_record(namespace, key, value, overwrite=overwrite)

    def list_records(
        self, namespace: str, prefix: str = "", limit: int | None = None
    ) -> list[RecordInfo]:
        return self.shared.list_records(namespace, prefix, limit)

    def delete_record(self, namespace: str, key: str) -> None:
        self.shared.delete_record(namespace, key)

    def stats(self) -> StoreStats | None:
        return self.fast.stats()

    def largest_entries(self, count: int) -> list[EntrySize] | None:
        return self.fast.largest_entries(count)  # the local tier's: S3's are not known

    def request_counts(self) -> dict[str, int]:
        return self.shared.request_counts()

    def close(self) -> None:
        try:
            self.shared.close()
        finally:
            self.fast.close()


def _tee(chunks: Iterator[Chunk], writer: BlobWriter) -> Iterator[Chunk]:
    """Pass chunks through while copying them to the disk; commit (verified) at the end."""
    ok = True
    try:
        for chunk in chunks:
            if ok:
                try:
                    writer.write(chunk)
                except (OSError, DigestError) as exc:
                    log.warning("disk cache fill of %s stopped: %s", writer.blob, exc)
                    writer.abort()
                    ok = False
            yield chunk
        if ok:
            try:
                writer.commit()
            except (OSError, DigestError) as exc:
                log.warning("disk cache fill of %s failed: %s", writer.blob, exc)
    finally:
        writer.abort()


class _TieredWriter(BlobWriter):
    """Writes to both; the shared commit decides, the disk copy is best effort."""

    def __init__(self, blob: BlobId, shared: BlobWriter, local: BlobWriter | None) -> None:
        super().__init__(blob)
        self._shared = shared
        self._local = local

    def write(self, data: Chunk) -> None:
        self._shared.write(data)
        self.committed_size = self._shared.committed_size
        if self._local is not None:
            try:
                self._local.write(data)
            except (OSError, DigestError) as exc:
                log.warning("disk copy of %s dropped: %s", self.blob, exc)
                self._drop_local()

    def _drop_local(self) -> None:
        if self._local is not None:
            self._local.abort()
            self._local = None

    def commit(self) -> None:
        try:
            self._shared.commit()
        except BaseException:
            self._drop_local()
            raise
        if self._local is not None:
            try:
                self._local.commit()
            except (OSError, DigestError) as exc:
                log.warning("disk copy of %s not kept: %s", self.blob, exc)
            self._local = None

    def abort(self) -> None:
        try:
            self._shared.abort()
        finally:
            self._drop_local()
