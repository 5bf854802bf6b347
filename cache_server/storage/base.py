"""The one storage interface every backend (disk, S3, tiered) implements.

Stores are synchronous and thread-safe; the asyncio gRPC services call them in
worker threads. A store holds two kinds of things:

- CAS blobs, addressed by their SHA-256 digest. A store never makes a blob
  visible unless its content matches its digest, and never returns bytes that
  differ from what was verified on the way in.
- Records: small values under a (namespace, key) name, e.g. action results
  ("ac"), layer keys ("layers"), timing history ("timings"), pinned split plans.

A store with a size bound counts blobs and records of every namespace toward it and
evicts the least recently used of them, whatever their kind: no kind of write can
grow a bounded store past its bound.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, unquote

from slipstream.core.digests import BlobId, DigestError
from slipstream.core.records import MAX_RECORD_KEY_CHARS

X = TypeVar("X")
Y = TypeVar("Y")

_NAMESPACE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_MAX_ENCODED_KEY = 240  # below the 255-byte file name limit of common filesystems


class StoreFull(Exception):
    """The blob cannot fit within the store's size bound."""


class DiskFull(StoreFull, OSError):
    """The filesystem under the store has no space (or quota) left for a write.

    An OSError too, so code that shrugs off a failed local copy (the disk tier)
    shrugs this off as well."""


_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def no_space(exc: OSError) -> bool:
    """Whether an OSError says the disk (or the quota) is full."""
    return exc.errno in _NO_SPACE


class StoreUnavailable(Exception):
    """The backing store cannot be reached right now (e.g. S3 is down)."""


BlobRefused = DigestError | StoreFull | StoreUnavailable  # what refuses one blob of a batch


class RecordKeyError(ValueError):
    """A record namespace or key the store cannot hold."""


@dataclass(frozen=True, slots=True)
class RecordInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class EntrySize:
    """One stored entry and its size: a CAS blob (namespace "cas", name its hash) or a
    record (its namespace and key)."""

    namespace: str
    name: str
    size: int  # bytes of content


@dataclass(frozen=True, slots=True)
class StoreStats:
    blobs: int
    bytes_used: int  # what the bound counts: on disk, the space files take
    max_bytes: int | None
    evictions: int
    # The store's index is still loading: blobs and bytes_used count only what changed
    # since the store opened, not what it held before.
    loading: bool = False


def encode_record_key(namespace: str, key: str) -> str:
    """A filesystem- and S3-safe name for a record key; keeps prefix order.

    Each character encodes on its own, so a prefix of a key encodes to a prefix
    of the key's encoding, and prefix listings work on the encoded names.
    """
    if not _NAMESPACE.fullmatch(namespace):
        raise RecordKeyError(f"record namespace {namespace!r} is not valid")
    if not key or len(key) > MAX_RECORD_KEY_CHARS:
        raise RecordKeyError(f"record key must be 1 to {MAX_RECORD_KEY_CHARS} characters")
    encoded = quote(key, safe="-_~")
    if encoded.startswith("."):  # no key may become "." or ".." on disk
        encoded = "%2E" + encoded[1:]
    if len(encoded) > _MAX_ENCODED_KEY:
        raise RecordKeyError(f"record key {key[:40]!r}... is too long once encoded")
    return encoded


def decode_record_key(encoded: str) -> str:
    return unquote(encoded)


# What a BlobWriter takes: bytes, or a view into a message as it was received
# (cache_server.wire), which a writer must copy if it keeps it past
# the call and needs bytes.
Chunk = bytes | memoryview


class BlobWriter(abc.ABC):
    """A streamed write of one blob; nothing is visible until commit() succeeds."""

    def __init__(self, blob: BlobId) -> None:
        self.blob = blob
        self.committed_size = 0
        self._sha = hashlib.sha256()

    def _take(self, data: Chunk) -> None:
        """Count and hash data; DigestError once more bytes arrive than the digest's size."""
        if self.committed_size + len(data) > self.blob.size:
            raise DigestError(f"more than {self.blob.size} bytes sent for blob {self.blob}")
        self._sha.update(data)
        self.committed_size += len(data)

    def _check_complete(self) -> None:
        """DigestError unless exactly the blob's bytes were taken."""
        if self.committed_size != self.blob.size:
            raise DigestError(
                f"blob {self.blob} ended after {self.committed_size} of {self.blob.size} bytes"
            )
        if self._sha.hexdigest() != self.blob.hash:
            raise DigestError(f"blob {self.blob} hashes to {self._sha.hexdigest()}")

    @abc.abstractmethod
    def write(self, data: Chunk) -> None:
        """Append data; raises DigestError once more bytes arrive than the digest's size."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Verify size and hash, then make the blob visible; raises DigestError on mismatch."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard what was written. Safe to call more than once, and after commit."""


class Store(abc.ABC):
    """Storage for CAS blobs and records; see the module docstring."""

    @property
    def finds_in_memory(self) -> bool:
        """True when find_missing answers from memory now, without waiting on I/O, so a
        caller on an event loop may call it in place rather than on a worker thread. It
        may change: a disk store's becomes true once its index is loaded."""
        return False

    @property
    def writes_in_place(self) -> bool:
        """True when small writes (put_blobs, put_record) wait on no device, no other
        process and no lock held for long now, though reads may (a disk store that does
        not sync: the page cache takes its files), so a caller on an event loop may make
        them in place, as works_in_memory's calls. It may change, as finds_in_memory."""
        return False

    # True when the chunks of read_blob come from memory, so a caller on an event
    # loop may take them in place rather than one worker-thread trip per chunk.
    reads_in_memory: bool = False
    # True when no call waits on I/O at all (everything is in this process's
    # memory, or on a RAM filesystem), so a caller on an event loop may make small
    # calls in place.
    works_in_memory: bool = False
    # With works_in_memory or writes_in_place, the most entries one call may touch and
    # still be made in place (each costs syscalls); None: any number.
    in_place_entries: int | None = None

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying what is stored where, for the server's start-up message."""

    def start_loading(self, on_loaded: Callable[[], None] | None = None) -> None:
        """Begin loading what the store keeps in memory (the disk store's index) in the
        background, and return at once: the store answers right meanwhile. on_loaded runs
        once it is loaded (here at once: nothing to load), on the loading thread."""
        if on_loaded is not None:
            on_loaded()

    # ---- CAS ----
    @abc.abstractmethod
    def find_missing(self, blobs: Sequence[BlobId]) -> list[BlobId]:
        """The blobs not present, in input order; refreshes the lifetime of the present ones."""

    @abc.abstractmethod
    def find_blob(self, sha256: str) -> BlobId | None:
        """The stored blob with this hash, size included, or None; refreshes its lifetime.

        For protocols that name blobs by hash alone (the HTTP cache). The content
        is not checked here: get_blob and read_blob check it.
        """

    @abc.abstractmethod
    def get_blob(self, blob: BlobId) -> bytes | None:
        """The whole blob, or None when it is missing (or found corrupt)."""

    @abc.abstractmethod
    def read_blob(
        self, blob: BlobId, offset: int = 0, chunk_size: int = 1 << 20
    ) -> Iterator[Chunk] | None:
        """Chunks of the blob from offset on, or None when it is missing.

        The content is checked: a corrupt blob is reported as missing when that
        is known up front (small blobs), and otherwise the iterator raises
        StoreUnavailable before it produces the last chunk, so a corrupt blob is
        never read through to its end.
        """

    @abc.abstractmethod
    def put_blob(self, blob: BlobId, data: bytes) -> None:
        """Store data under blob after verifying it; raises DigestError on mismatch."""

    @abc.abstractmethod
    def open_writer(self, blob: BlobId) -> BlobWriter:
        """Start a streamed write of blob."""

    # ---- records ----
    @abc.abstractmethod
    def get_record(self, namespace: str, key: str) -> bytes | None:
        """The record's value, or None."""

    @abc.abstractmethod
    def put_record(self, namespace: str, key: str, value: bytes, *, overwrite: bool = True) -> bool:
        """Store a record; with overwrite=False, an existing record is kept and False returned."""

    @abc.abstractmethod
    def list_records(
        self, namespace: str, prefix: str = "", limit: int | None = None
    ) -> list[RecordInfo]:
        """The records whose key starts with prefix, in key order. With a limit, at most
        that many, and the store stops looking once it has them: which of more matching
        records it returns is the store's choice."""

    @abc.abstractmethod
    def delete_record(self, namespace: str, key: str) -> None:
        """Remove a record if present."""

    def map_blobs(self, fn: Callable[[X], Y], items: Sequence[X]) -> list[Y]:
        """fn (which calls this store) applied to each item, results in order.

        Batch RPCs go through here: a backend with slow round trips (S3) runs
        the calls in parallel; a local one runs them in turn.
        """
        return [fn(item) for item in items]

    def put_blobs(
        self, items: Sequence[X], unpack: Callable[[X], tuple[BlobId, bytes]]
    ) -> list[BlobRefused | None]:
        """put_blob of the blob each item unpacks to, through map_blobs. Per item: None
        once stored, else the error that refused it (unpack may raise DigestError).

        Batch writes come here, so that a store can make a whole batch durable at once
        rather than blob by blob; each blob is stored and durable before this returns.
        """

        def one(item: X) -> BlobRefused | None:
            try:
                self.put_blob(*unpack(item))
            except (DigestError, StoreFull, StoreUnavailable) as exc:
                return exc
            return None

        return self.map_blobs(one, items)

    def get_blobs(self, blobs: Sequence[BlobId]) -> list[Chunk | StoreUnavailable | None]:
        """get_blob of each blob, in order, through map_blobs. A blob the store could
        not be asked about gives the StoreUnavailable saying why, where get_blob
        raises it: one blob's failure does not fail the others."""

        def one(blob: BlobId) -> bytes | StoreUnavailable | None:
            try:
                return self.get_blob(blob)
            except StoreUnavailable as exc:
                return exc

        return self.map_blobs(one, blobs)

    def stats(self) -> StoreStats | None:
        """Size figures for metrics, where the backend knows them cheaply."""
        return None

    def largest_entries(self, count: int) -> list[EntrySize] | None:
        """The count largest entries, largest first, where the backend knows every
        entry's size in memory; None where it does not (S3). It walks the whole index:
        callers keep the answer for a while."""
        return None

    def request_counts(self) -> dict[str, int]:
        """Requests sent to a remote backend so far, retries included, by operation (for
        metrics); empty for a store with no remote backend."""
        return {}

    def operation_counts(self) -> dict[str, int]:
        """Calls made of this store so far, by operation, where it counts them (for
        metrics: storage/counting.py); empty otherwise."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, connections)."""
