"""The embedded default store: content-addressed files under one directory.

Layout under the root:
    cas/ab/<hash>            blobs, sharded by the first two hex digits
    records/<namespace>/<k>  records, k being the percent-encoded key
    tmp/                     writes in progress (cleared at start)

Every file starts with a 16-byte header: a magic, then the xxh3-64 checksum of
the payload. A blob becomes visible only whole (written to tmp/, then renamed
into place), so a crash or a dropped client never leaves a readable partial
blob, and corruption on disk is caught on read and treated as a missing blob.

Every write is durable before it is acknowledged (unless made with sync=False,
`--no-fsync`): the file is fsync-ed before it is renamed into place, and its
directory after, so a power cut loses nothing the server said it stored. A
batch syncs its files together, then each of their directories once. On a RAM
filesystem there is nothing to sync to, and nothing is.

What the store holds, its LRU order and its size bound are its index's
(storage/disk_index.py): this process's own, or, for the workers of
`serve --workers N`, one kept by their supervisor (storage/shared_index.py).

CAS blobs and records of every namespace share one size bound with LRU eviction. The
bound counts the space entries take, not the bytes written: each file counts whole
filesystem blocks (a 20-byte blob takes 4 KiB on ext4) plus DIRECTORY_ENTRY_BYTES
(storage/disk_index.py) for its name in its directory. Reading or finding an entry
refreshes it; the order survives a restart through the files' modification times,
which are bumped on access (at most once a minute per entry, to keep hot paths free
of syscalls).

On a RAM filesystem (tmpfs), where no call waits on a device, small calls and the
chunks of ByteStream reads are made in place on the event loop, as the memory
store's are (`Store.works_in_memory`, `Store.reads_in_memory`): worker-thread trips
cost the mixed load ~20% of its calls and most of its tail latency. Without fsync
(`--no-fsync`) on a disk, small batch writes and action results are made in place
too (`Store.writes_in_place`): their files go to the kernel's page cache, and the
trip to a worker thread cost more than the writes (the GIL handed over around each
syscall, ~45% of the server's samples under a load of writes). Reads stay on worker
threads: a file not in the page cache waits on the disk.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import pathlib
import re
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import xxhash

from slipstream.cache_server.storage.base import (
    BlobRefused,
    BlobWriter,
    Chunk,
    DiskFull,
    EntrySize,
    RecordInfo,
    Store,
    StoreFull,
    StoreStats,
    StoreUnavailable,
    X,
    decode_record_key,
    encode_record_key,
    no_space,
)
from slipstream.cache_server.storage.disk_index import (
    DiskIndex,
    LocalIndex,
    block_size_of,
    space_taken,
)
from slipstream.core.digests import EMPTY_BLOB, BlobId, DigestError, verify

log = logging.getLogger(__name__)

_MAGIC = b"SLS1"
_HEADER = struct.Struct(">4s4xQ")  # magic, padding, xxh3-64 of the payload
_ABANDONED_AFTER = 24 * 3600.0
_READ_CHUNK = 1 << 20
_ONE_READ_MAX = 64 << 20  # the largest size hint _read_checked_file reads in one go
_TMP_NAMES = itertools.count()  # next() on it is atomic under the GIL
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
# Files one call may touch in place on a RAM filesystem: 6-25 us each on tmpfs here,
# so at most ~1.5 ms that the event loop does nothing else.
IN_PLACE_FILES = 64
_MOUNTS_ESCAPE = re.compile(r"\\([0-7]{3})")  # /proc/mounts writes " " as "\040"
# fsync calls of one batch in flight at once: the filesystem commits concurrent syncs
# together (ext4 and xfs group commit), where serial ones cost a journal commit each.
SYNC_THREADS = 32
_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_lock = threading.Lock()


def fsync_path(path: str, directory: bool = False) -> None:
    """Flush a file's data, or a directory's entries, to the device."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_paths(paths: Collection[str], directories: bool = False) -> None:
    """fsync_path of each, at once (up to SYNC_THREADS) when there are several."""
    global _sync_pool
    if len(paths) <= 1:
        for path in paths:
            fsync_path(path, directories)
        return
    with _sync_pool_lock:
        if _sync_pool is None:
            _sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="fsync")
    list(_sync_pool.map(functools.partial(fsync_path, directory=directories), paths))


def filesystem_of(path: str, mounts: str) -> str:
    """The type of the filesystem holding the absolute, resolved path, given the text
    of /proc/mounts: that of the longest mount point above it; "unknown" if none is."""
    best, kind = "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = _MOUNTS_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def filesystem_type(path: pathlib.Path) -> str:
    """The type of the filesystem holding path ("tmpfs", "ext4", ...), "unknown"
    where /proc/mounts cannot tell."""
    try:
        return filesystem_of(str(path.resolve()), pathlib.Path("/proc/mounts").read_text())
    except OSError:
        return "unknown"


def default_storage_dir() -> pathlib.Path:
    """Where the server keeps its data when no --storage is given."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "slipstream"


def _alive(pid: str) -> bool:
    """Whether the process that named a temp file still runs (False if unparsable)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _CorruptFile(Exception):
    pass


@contextlib.contextmanager
def _space_checked(root: pathlib.Path, what: str) -> Iterator[None]:
    """Turn "no space left" (or "quota exceeded") into DiskFull, saying so."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, DiskFull) or not no_space(exc):
            raise
        raise DiskFull(f"disk full: cannot {what} in {root}: {exc.strerror}") from None


def _check_header(path: pathlib.Path | str, header: bytes) -> int:
    """The payload checksum a header records; _CorruptFile if it is not our header."""
    if len(header) != _HEADER.size:
        raise _CorruptFile(f"{path}: truncated header")
    magic, expected = _HEADER.unpack(header)
    if magic != _MAGIC:
        raise _CorruptFile(f"{path}: bad magic")
    return int(expected)


def _read_checked_file(path: str, size_hint: int = -1) -> memoryview | None:
    """A small stored file's payload, read in one go and verified; None if absent.
    The payload is a view of what was read: slicing the header off would copy it.

    size_hint, the payload size when the caller knows it, saves a stat call.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # A hint past what one read should take (a digest's size is the caller's
        # word, up to 2^63-1) is not trusted: the file's own size is.
        hinted = 0 <= size_hint <= _ONE_READ_MAX
        want = _HEADER.size + size_hint + 1 if hinted else os.fstat(fd).st_size + 1
        raw = os.read(fd, want)
        if len(raw) == want:  # larger than expected: read the rest
            raw += b"".join(iter(functools.partial(os.read, fd, _READ_CHUNK), b""))
    finally:
        os.close(fd)
    expected = _check_header(path, raw[: _HEADER.size])
    payload = memoryview(raw)[_HEADER.size :]
    if xxhash.xxh3_64_intdigest(payload) != expected:
        raise _CorruptFile(f"{path}: checksum mismatch")
    return payload


class DiskStore(Store):
    """CAS and records on the local filesystem, bounded by max_size bytes.

    The server starts loading the index in the background (start_loading) and serves
    at once. While it loads, every answer is still right: a blob or record the index
    does not know yet is looked up on disk (a stat, or the read itself), never
    reported missing while its file is there, nor present while it is not; what is
    written, read or removed meanwhile is kept apart and merged with the scan, so the
    figures are exact once loaded (storage/disk_index.py). Until then stats() says
    loading (its figures count only those changes), nothing is evicted (the bound
    may be passed by what is written meanwhile, and is restored at the end of the
    load), and largest_entries() is None.
    """

    # Where it works in place (on a RAM filesystem): each file costs syscalls.
    in_place_entries = IN_PLACE_FILES

    def __init__(
        self,
        root: pathlib.Path,
        max_size: int | None = None,
        *,
        create: bool = True,
        sync: bool = True,
        index: DiskIndex | None = None,
    ) -> None:
        """The store under root; create=False reads an existing directory as it is,
        making no directories and clearing no leftovers (a history read by the CLI).
        With sync (the default), writes are durable before they return. index is what
        knows the entries (storage/disk_index.py): by default this process's own."""
        self.root = root
        self.max_size = max_size
        self._tmp = root / "tmp"
        if create:
            for sub in ("cas", "records", "tmp"):
                (root / sub).mkdir(parents=True, exist_ok=True)
        self.filesystem = filesystem_type(root)
        self.block_size = block_size_of(root)
        self.index = LocalIndex(root, max_size, self.block_size) if index is None else index
        self.works_in_memory = self.reads_in_memory = self.filesystem in RAM_FILESYSTEMS
        self.syncs = sync and self.filesystem not in RAM_FILESYSTEMS
        if create:
            if self.syncs:  # the layout's own directories, perhaps just made
                fsync_paths([str(root), str(root.resolve().parent)], directories=True)
            self._clear_tmp()

    # ---- set-up ----
    def _clear_tmp(self) -> None:
        """Remove writes left by processes that died.

        Other live processes (a CLI reading timings beside the server) may
        share the directory, so only files of dead or long-gone writers go.
        """
        cutoff = time.time() - _ABANDONED_AFTER
        for leftover in self._tmp.iterdir():
            pid, _, _ = leftover.name.partition("-")
            with contextlib.suppress(OSError):
                if not _alive(pid) or leftover.stat().st_mtime < cutoff:
                    leftover.unlink()

    @property
    def finds_in_memory(self) -> bool:
        """Finds read the in-memory index once it is loaded, and the only syscalls are
        the access-time bumps, once a minute per entry. Not while it loads (a find may
        stat files), nor with a worker's shared index (storage/shared_index.py)."""
        return self.index.in_memory and self.index.loaded

    @property
    def writes_in_place(self) -> bool:
        """Unsynced, a write of a few small files waits on no device. Not while this
        process's own index loads (its merge holds the index's lock); a worker's shared
        index never waits (its admissions are queued for the supervisor)."""
        return not self.syncs and (self.index.loaded or not self.index.in_memory)

    def start_loading(self, on_loaded: Callable[[], None] | None = None) -> None:
        self.index.start_loading(on_loaded)

    def describe(self) -> str:
        """Never waits for a load under way: says "index loading" instead of figures."""
        bound = f"up to {self.max_size:,} bytes" if self.max_size else "no size bound"
        if self.index.loading:
            used = "index loading"
        else:
            entries, used_bytes, _ = self.index.figures()
            used = f"{entries:,} entries taking {used_bytes:,} bytes"
        synced = "" if self.syncs or self.filesystem in RAM_FILESYSTEMS else "; not synced"
        return f"disk store at {self.root} on {self.filesystem} ({bound}; {used}{synced})"

    # ---- paths and LRU ----
    @staticmethod
    def _blob_rel(blob: BlobId) -> str:
        return f"cas/{blob.hash[:2]}/{blob.hash}"

    @staticmethod
    def _record_rel(namespace: str, key: str) -> str:
        return f"records/{namespace}/{encode_record_key(namespace, key)}"

    def _check_fits(self, size: int) -> None:
        if self.max_size is None:
            return
        taken = space_taken(size + _HEADER.size, self.block_size)
        if taken > self.max_size:
            raise StoreFull(
                f"{size:,} bytes take {taken:,} on disk and do not fit"
                f" in a store bounded at {self.max_size:,}"
            )

    def _install(self, tmp_path: str, rel: str, size: int, sync_dir: bool = True) -> str:
        """Rename a finished temp file (size bytes on disk) into place: the blob appears
        whole. Returns its directory, which is synced here unless sync_dir is false."""
        final = os.path.join(self.root, rel)
        directory = os.path.dirname(final)
        try:
            os.replace(tmp_path, final)
        except FileNotFoundError:  # first file of its shard or namespace
            self._make_dir(directory)
            os.replace(tmp_path, final)
        if self.syncs and sync_dir:
            fsync_path(directory, directory=True)
        self.index.admit(rel, size)
        return directory

    def _make_dir(self, directory: str) -> None:
        """Make a shard or namespace directory; its name is synced into its parent."""
        try:
            os.mkdir(directory)
        except FileExistsError:
            return
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
        if self.syncs:
            fsync_path(os.path.dirname(directory), directory=True)

    def _new_tmp(self) -> str:
        # pid first (see _clear_tmp), then a counter unique within this process.
        return f"{self._tmp}/{os.getpid()}-{next(_TMP_NAMES)}"

    def _write_file(self, tmp_path: str, payload: bytes, sync: bool) -> int:
        """Write header and payload to a new file, fsync-ed if sync; returns its size."""
        header = _HEADER.pack(_MAGIC, xxhash.xxh3_64_intdigest(payload))
        size = len(header) + len(payload)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            written = os.writev(fd, [header, payload])  # one syscall in the usual case
            rest = memoryview(header + payload)[written:] if written < size else None
            while rest:
                rest = rest[os.write(fd, rest) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return size

    def _read_checked(self, rel: str, size_hint: int = -1) -> memoryview | None:
        try:
            data = _read_checked_file(os.path.join(self.root, rel), size_hint)
        except _CorruptFile as exc:
            self._drop_corrupt(rel, exc)
            return None
        if data is None:
            self.index.forget(rel)
        return data

    def _read_blob_file(self, blob: BlobId) -> memoryview | None:
        """The blob's verified payload; None if absent or stored under another size
        (the hash alone does not name it: that stored blob is kept as it is). The
        index tells the size, so a wrong one costs no read."""
        rel = self._blob_rel(blob)
        if not self.index.may_hold(rel, _HEADER.size + blob.size):
            return None
        data = self._read_checked(rel, blob.size)
        return data if data is not None and len(data) == blob.size else None

    def _drop_corrupt(self, rel: str, exc: Exception) -> None:
        log.warning("dropping corrupt entry: %s", exc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / rel)
        self.index.forget(rel)

    # ---- CAS ----
    def find_missing(self, blobs: Sequence[BlobId]) -> list[BlobId]:
        found = self.index.present(
            map(self._blob_rel, blobs), [_HEADER.size + b.size for b in blobs]
        )
        return [b for b, ok in zip(blobs, found, strict=True) if not ok and b != EMPTY_BLOB]

    def find_blob(self, sha256: str) -> BlobId | None:
        if sha256 == EMPTY_BLOB.hash:
            return EMPTY_BLOB
        rel = self._blob_rel(BlobId(sha256, 0))  # validates the hash
        try:
            size = os.stat(self.root / rel).st_size - _HEADER.size
        except FileNotFoundError:
            return None
        if size < 0 or not self.index.present((rel,))[0]:
            return None
        return BlobId(sha256, size)

    def get_blob(self, blob: BlobId) -> bytes | None:
        if blob == EMPTY_BLOB:
            return b""
        data = self._read_blob_file(blob)
        if data is None:
            return None
        self.index.touched((self._blob_rel(blob),))
        return bytes(data)

    def get_blobs(self, blobs: Sequence[BlobId]) -> list[Chunk | StoreUnavailable | None]:
        # Batch reads of small blobs are bound by this loop: the payloads stay views
        # of what was read, and the LRU is touched once for the lot.
        datas: list[Chunk | StoreUnavailable | None] = []
        found = []
        for blob in blobs:
            if blob == EMPTY_BLOB:
                datas.append(b"")
                continue
            data = self._read_blob_file(blob)
            if data is not None:
                found.append(self._blob_rel(blob))
            datas.append(data)
        self.index.touched(found)
        return datas

    def read_blob(
        self, blob: BlobId, offset: int = 0, chunk_size: int = 1 << 20
    ) -> Iterator[bytes] | None:
        if blob == EMPTY_BLOB:
            return iter(())
        rel = self._blob_rel(blob)
        if not self.index.may_hold(rel, _HEADER.size + blob.size):
            return None
        if blob.size <= chunk_size:  # one read: checked before anything is returned
            data = self.get_blob(blob)
            return None if data is None else iter((data[offset:],) if offset < len(data) else ())
        path = os.path.join(self.root, rel)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            self.index.forget(rel)
            return None
        try:
            expected = _check_header(path, f.read(_HEADER.size))
        except _CorruptFile as exc:
            f.close()
            self._drop_corrupt(rel, exc)
            return None
        if os.fstat(f.fileno()).st_size != _HEADER.size + blob.size:
            f.close()  # the same hash under another size: not this digest
            return None
        self.index.touched((rel,))
        return self._verified_chunks(f, rel, blob, expected, offset, chunk_size)

    def _verified_chunks(
        self, f: BinaryIO, rel: str, blob: BlobId, expected: int, offset: int, chunk_size: int
    ) -> Iterator[bytes]:
        """The payload from offset on, checked as it streams (one pass over the file):
        the last chunk is held back until the whole payload matched its checksum, so
        a corrupt blob never reads through to its end."""
        xxh = xxhash.xxh3_64()
        skip = offset  # bytes before offset are hashed but not produced
        pending = b""
        with f:
            while chunk := f.read(chunk_size):
                xxh.update(chunk)
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                if pending:
                    yield pending
                pending = chunk
        if xxh.intdigest() != expected:
            self._drop_corrupt(rel, _CorruptFile(f"{rel}: checksum mismatch"))
            raise StoreUnavailable(f"blob {blob} failed its checksum on disk and was dropped")
        if pending:
            yield pending

    def put_blob(self, blob: BlobId, data: bytes) -> None:
        self._put_blob(blob, data, self.syncs)

    def fill_blob(self, blob: BlobId, data: bytes) -> None:
        """put_blob without syncing: for a copy of a blob that another store holds."""
        self._put_blob(blob, data, False)

    def _put_blob(self, blob: BlobId, data: bytes, sync: bool) -> None:
        verify(data, blob)
        if blob == EMPTY_BLOB:
            return
        self._check_fits(blob.size)
        tmp_path = self._new_tmp()
        try:
            with _space_checked(self.root, f"store blob {blob}"):
                size = self._write_file(tmp_path, data, sync)
                self._install(tmp_path, self._blob_rel(blob), size, sync_dir=sync)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
            raise

    def put_blobs(
        self, items: Sequence[X], unpack: Callable[[X], tuple[BlobId, bytes]]
    ) -> list[BlobRefused | None]:
        """Every blob written aside, then all files synced at once, renamed into place,
        and each directory they went to synced once: a batch of N small blobs costs
        about as much as one, not N journal commits."""
        if not self.syncs:
            return super().put_blobs(items, unpack)
        results: list[BlobRefused | None] = []
        staged: list[tuple[str, BlobId, int]] = []  # temp file, blob, size on disk
        try:
            for item in items:
                try:
                    blob, data = unpack(item)
                    verify(data, blob)
                    if blob != EMPTY_BLOB:
                        self._check_fits(blob.size)
                        tmp_path = self._new_tmp()
                        try:
                            with _space_checked(self.root, f"store blob {blob}"):
                                size = self._write_file(tmp_path, data, False)
                        except BaseException:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(tmp_path)
                            raise
                        staged.append((tmp_path, blob, size))
                except (DigestError, StoreFull, StoreUnavailable) as exc:
                    results.append(exc)
                else:
                    results.append(None)
            with _space_checked(self.root, f"store a batch of {len(staged)} blobs"):
                fsync_paths([tmp_path for tmp_path, _, _ in staged])
                directories = {
                    self._install(tmp_path, self._blob_rel(blob), size, sync_dir=False)
                    for tmp_path, blob, size in staged
                }
                fsync_paths(directories, directories=True)
        finally:
            for tmp_path, _, _ in staged:  # left only if something failed
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_path)
        return results

    def open_writer(self, blob: BlobId) -> BlobWriter:
        self._check_fits(blob.size)
        return _DiskBlobWriter(self, blob, self.syncs)

    def open_fill_writer(self, blob: BlobId) -> BlobWriter:
        """open_writer without syncing: for a copy of a blob that another store holds."""
        self._check_fits(blob.size)
        return _DiskBlobWriter(self, blob, False)

    # ---- records ----
    def get_record(self, namespace: str, key: str) -> bytes | None:
        rel = self._record_rel(namespace, key)
        data = self._read_checked(rel)
        if data is None:
            return None
        self.index.touched((rel,))
        return bytes(data)

    def put_record(self, namespace: str, key: str, value: bytes, *, overwrite: bool = True) -> bool:
        rel = self._record_rel(namespace, key)
        self._check_fits(len(value))
        tmp_path = self._new_tmp()
        try:
            with _space_checked(self.root, f"store a {namespace} record"):
                return self._put_record_file(tmp_path, rel, value, overwrite)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)

    def _put_record_file(self, tmp_path: str, rel: str, value: bytes, overwrite: bool) -> bool:
        """Write value to tmp_path and put it in place at rel (the caller removes tmp_path)."""
        size = self._write_file(tmp_path, value, self.syncs)
        if overwrite:
            self._install(tmp_path, rel, size)
            return True
        final = self.root / rel
        self._make_dir(str(final.parent))
        try:
            os.link(tmp_path, final)  # atomic create-if-absent
        except FileExistsError:
            return False
        if self.syncs:
            fsync_path(str(final.parent), directory=True)
        self.index.admit(rel, size)
        return True

    def list_records(
        self, namespace: str, prefix: str = "", limit: int | None = None
    ) -> list[RecordInfo]:
        encoded_prefix = encode_record_key(namespace, prefix) if prefix else ""
        ns_dir = self.root / "records" / namespace
        if not ns_dir.is_dir():
            return []
        found: list[RecordInfo] = []
        with os.scandir(ns_dir) as it:
            for item in it:
                if limit is not None and len(found) >= limit:
                    break
                if item.name.startswith(encoded_prefix):
                    try:
                        st = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    found.append(
                        RecordInfo(
                            decode_record_key(item.name), st.st_size - _HEADER.size, st.st_mtime
                        )
                    )
        found.sort(key=lambda r: r.key)
        return found

    def delete_record(self, namespace: str, key: str) -> None:
        rel = self._record_rel(namespace, key)
        try:
            os.unlink(self.root / rel)
        except FileNotFoundError:
            return
        finally:
            self.index.forget(rel)
        if self.syncs:
            fsync_path(str((self.root / rel).parent), directory=True)

    def stats(self) -> StoreStats:
        return self.index.stats(self.max_size)

    def close(self) -> None:
        self.index.close()

    def largest_entries(self, count: int) -> list[EntrySize] | None:
        largest = self.index.largest(count)
        if largest is None:
            return None
        found = []
        for rel, size in largest:
            top, namespace, name = rel.split("/", 2)  # cas/SHARD/HASH, records/NS/ENCODED
            if top == "cas":
                namespace = "cas"
            else:
                name = decode_record_key(name)
            found.append(EntrySize(namespace, name, size - _HEADER.size))
        return found


class _DiskBlobWriter(BlobWriter):
    """Streams into a temp file, hashing as it goes; commit verifies and renames."""

    def __init__(self, store: DiskStore, blob: BlobId, sync: bool) -> None:
        super().__init__(blob)
        self._store = store
        self._sync = sync
        self._path = store._new_tmp()
        self._file: BinaryIO | None = None
        with _space_checked(store.root, f"store blob {blob}"):
            self._file = open(self._path, "wb")  # noqa: SIM115
            try:
                self._file.write(b"\0" * _HEADER.size)
            except BaseException:
                self.abort()
                raise
        self._xxh = xxhash.xxh3_64()

    def write(self, data: Chunk) -> None:
        if self._file is None:
            raise DigestError("write after the blob was committed or aborted")
        self._take(data)
        with _space_checked(self._store.root, f"store blob {self.blob}"):
            self._file.write(data)
        self._xxh.update(data)

    def commit(self) -> None:
        if self._file is None:
            raise DigestError("commit after the blob was committed or aborted")
        try:
            self._check_complete()
            with _space_checked(self._store.root, f"store blob {self.blob}"):
                self._file.seek(0)
                self._file.write(_HEADER.pack(_MAGIC, self._xxh.intdigest()))
                if self._sync:
                    self._file.flush()
                    os.fsync(self._file.fileno())
                file, self._file = self._file, None
                file.close()
                if self.blob != EMPTY_BLOB:
                    size = _HEADER.size + self.blob.size
                    rel = self._store._blob_rel(self.blob)
                    self._store._install(self._path, rel, size, sync_dir=self._sync)
        finally:
            self.abort()

    def abort(self) -> None:
        file, self._file = self._file, None
        try:
            if file is not None:
                # Closing flushes what is buffered, which fails on a full disk; the
                # file is closed all the same, and removed below either way.
                with contextlib.suppress(OSError):
                    file.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
