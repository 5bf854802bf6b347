"""The disk store's index: which entries it holds, their sizes and their LRU order.

DiskStore (storage/disk.py) asks its index three things: whether an entry is there
(finds), to note entries read or written (the LRU order, the size bound), and the
figures for metrics. Two indexes answer:

- LocalIndex, the one of a single server process: an in-memory LRU of every entry,
  built by scanning the directory on first use; it evicts the least recently used
  entries past the size bound.
- SharedIndex (storage/shared_index.py), the one of each worker of
  `slipstream serve --workers N`: finds ask the filesystem, and what is read or
  written is reported to the supervisor's LocalIndex, the one accountant of the
  directory, which evicts for all of them.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import heapq
import itertools
import os
import pathlib
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

# An index entry: (file size, header included; last access time); the bound counts
# space_taken of the size. A plain tuple of numbers, which CPython's cycle collector
# stops tracking after one collection: an index of a million entries then costs full
# collections nothing, where a million small objects cost each of them ~65 ms.
_Entry = tuple[int, float]
TOUCH_INTERVAL = 60.0  # seconds between access-time bumps of one entry's file
# The kinds of report a worker makes to the accountant (LocalIndex.apply).
ADMITTED, TOUCHED, FORGOTTEN = "+", "=", "-"
# What one more file's name costs its directory on ext4: an 8-byte entry header and the
# 64-character name (72 bytes), in hash-indexed blocks that run about two-thirds full.
DIRECTORY_ENTRY_BYTES = 112
# Most threads scanning a store's directories at once when its index loads (one per
# core): more only contend for the GIL, costing CPU for nothing on a warm cache.
SCAN_THREADS = 8


def block_size_of(path: pathlib.Path) -> int:
    """The filesystem's allocation unit under path (4096 if it cannot tell)."""
    try:
        return os.statvfs(path).f_frsize or 4096
    except OSError:
        return 4096


def space_taken(size: int, block: int) -> int:
    """What a file of size bytes takes on a filesystem of this block size: its whole
    blocks, and its directory entry."""
    return -(-size // block) * block + DIRECTORY_ENTRY_BYTES


class DiskIndex(abc.ABC):
    """What DiskStore knows of the entries (paths relative to its root) it holds."""

    # True when present() answers from memory, without a syscall per entry.
    in_memory: bool = True

    @abc.abstractmethod
    def load(self) -> None:
        """Be ready to answer (the local index scans the directory, once)."""

    @abc.abstractmethod
    def present(self, rels: Iterable[str], sizes: Iterable[int] | None = None) -> list[bool]:
        """Whether each entry is held, refreshing the ones that are. With sizes (on
        disk, header included), an entry of another size counts as absent."""

    @abc.abstractmethod
    def may_hold(self, rel: str, size: int) -> bool:
        """False when the entry is surely not held with this size (a read can be
        skipped); True when it may be (the file then tells)."""

    @abc.abstractmethod
    def touched(self, rels: Sequence[str]) -> None:
        """Entries just read: refresh their place in the LRU."""

    @abc.abstractmethod
    def admit(self, rel: str, size: int) -> None:
        """A file of size bytes just put in place, evicting older ones if need be."""

    @abc.abstractmethod
    def forget(self, rel: str) -> None:
        """An entry found gone or removed."""

    @abc.abstractmethod
    def figures(self) -> tuple[int, int, int]:
        """(entries, bytes they take on disk, evictions so far)."""

    def largest(self, count: int) -> list[tuple[str, int]] | None:
        """The count largest entries, largest first: (rel, file size, header included);
        None where the index does not know every entry's size (a worker's)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Finish what is under way (a worker's reports)."""


class Scanned(NamedTuple):
    """Entries found under a store's root, in three flat lists of the same length."""

    rels: list[str]  # paths relative to the root
    sizes: list[int]  # file sizes, header included
    mtimes: list[float]  # modification times: the last access, for the LRU order


def scan_entries(root: pathlib.Path) -> Scanned:
    """Every blob and record under root, in no particular order.

    Each costs a stat call, mostly kernel time, which one thread per core (up to
    SCAN_THREADS) makes at once: os.stat gives up the GIL. A file removed while the
    scan runs (by another process sharing the store) is left out.
    """
    directories = [
        (entry.path, f"{kind}/{entry.name}/")
        for kind in ("cas", "records")
        for entry in _subdirectories(root / kind)
    ]
    found = Scanned([], [], [])
    threads = min(SCAN_THREADS, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="index-scan") as pool:
        for part in pool.map(_scan, *zip(*directories, strict=True)):
            found.rels.extend(part.rels)
            found.sizes.extend(part.sizes)
            found.mtimes.extend(part.mtimes)
    return found


def _subdirectories(directory: pathlib.Path) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as it:
        return [entry for entry in it if entry.is_dir()]


def _scan(directory: str, prefix: str) -> Scanned:
    """The entries of one shard or namespace directory (their paths: prefix + name)."""
    found = Scanned([], [], [])
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stat = os.stat
        for name in os.listdir(fd):
            try:  # relative to the directory: no path walk in the kernel per file
                st = stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.rels.append(prefix + name)
            found.sizes.append(st.st_size)
            found.mtimes.append(st.st_mtime)
    finally:
        os.close(fd)
    return found


class LocalIndex(DiskIndex):
    """An in-memory LRU of every entry under root, bounded by max_size bytes of the space
    they take on a filesystem of block_size blocks (space_taken)."""

    def __init__(self, root: pathlib.Path, max_size: int | None, block_size: int) -> None:
        self.root = root
        self.max_size = max_size
        self.block_size = block_size
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._bytes_used = 0
        self._evictions = 0
        self._indexed = False

    def load(self) -> None:
        """Build the LRU index on first use: record-only users never pay for the scan."""
        if self._indexed:
            return
        with self._lock:
            if not self._indexed:
                self._load_index_locked()
                self._indexed = True

    def _load_index_locked(self) -> None:
        """Every entry on disk, oldest access first. C loops over the scan's flat lists
        (a sort by time alone, one dict update), not Python code per entry: a million
        entries load in ~6.7 s of CPU here, where building, sorting and inserting an
        (mtime, path, size) tuple each took ~8.3."""
        found = scan_entries(self.root)
        # Float keys (CPython's fastest comparison); equal times keep the scan's order.
        order = sorted(range(len(found.rels)), key=found.mtimes.__getitem__)
        entries: list[_Entry] = list(zip(found.sizes, found.mtimes, strict=True))
        ordered = zip(
            map(found.rels.__getitem__, order), map(entries.__getitem__, order), strict=True
        )
        self._lru.update(ordered)
        block = self.block_size
        self._bytes_used += sum(space_taken(size, block) for size in found.sizes)
        self._evict_locked(keep=None)

    def present(self, rels: Iterable[str], sizes: Iterable[int] | None = None) -> list[bool]:
        """Under one lock and one clock read (finds carry thousands); the access-time
        bumps, at most one a minute per entry, come after."""
        self.load()
        now = time.time()
        found: list[bool] = []
        stale: list[str] = []
        lru = self._lru
        expected: Iterable[int | None] = itertools.repeat(None) if sizes is None else sizes
        with self._lock:
            for rel, want in zip(rels, expected, strict=False):  # expected may be endless
                entry = lru.get(rel)
                if entry is None or (want is not None and entry[0] != want):
                    found.append(False)
                    continue
                found.append(True)
                lru.move_to_end(rel)
                size, mtime = entry
                if now - mtime > TOUCH_INTERVAL:
                    lru[rel] = (size, now)
                    stale.append(rel)
        self._bump(stale, now)
        return found

    def _bump(self, rels: list[str], now: float) -> None:
        """Set the files' modification times: the LRU order survives a restart."""
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                os.utime(os.path.join(self.root, rel), (now, now))

    def may_hold(self, rel: str, size: int) -> bool:
        self.load()
        entry = self._lru.get(rel)  # a dict read: atomic under the GIL
        return entry is not None and entry[0] == size

    def touched(self, rels: Sequence[str]) -> None:
        if self._indexed or self.max_size is not None:  # a record-only reader need not index
            self.present(rels)

    def forget(self, rel: str) -> None:
        self.load()
        with self._lock:
            entry = self._lru.pop(rel, None)
            if entry is not None:
                self._bytes_used -= space_taken(entry[0], self.block_size)

    def admit(self, rel: str, size: int) -> None:
        if not self._indexed and self.max_size is None:
            return  # nothing to evict; the index, if it is ever built, finds the file
        self.load()
        with self._lock:
            self._admit_locked(rel, size, time.time())

    def _admit_locked(self, rel: str, size: int, now: float) -> None:
        old = self._lru.pop(rel, None)
        if old is not None:
            self._bytes_used -= space_taken(old[0], self.block_size)
        self._lru[rel] = (size, now)
        self._bytes_used += space_taken(size, self.block_size)
        self._evict_locked(keep=rel)

    def _evict_locked(self, keep: str | None) -> None:
        if self.max_size is None:
            return
        while self._bytes_used > self.max_size and self._lru:
            rel, (size, _) = next(iter(self._lru.items()))
            if rel == keep:
                break
            del self._lru[rel]
            self._bytes_used -= space_taken(size, self.block_size)
            self._evictions += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / rel)

    def figures(self) -> tuple[int, int, int]:
        self.load()
        with self._lock:
            return len(self._lru), self._bytes_used, self._evictions

    def largest(self, count: int) -> list[tuple[str, int]]:
        self.load()
        with self._lock:
            entries = list(self._lru.items())  # one C-level copy: the walk runs unlocked
        return [
            (rel, size) for rel, (size, _) in heapq.nlargest(count, entries, key=lambda e: e[1][0])
        ]

    def apply(self, reports: Iterable[tuple[str, str, int]]) -> None:
        """What a worker reported (storage/shared_index.py), in its order and under one
        lock: (ADMITTED, rel, size on disk) for a file put in place, (TOUCHED, rel, 0)
        for an entry read, (FORGOTTEN, rel, 0) for one found gone. An entry read that
        the index lacks (its admission lost with a worker that died) is looked up on
        disk."""
        self.load()
        now = time.time()
        stale: list[str] = []
        lru = self._lru
        with self._lock:
            for kind, rel, size in reports:
                if kind == TOUCHED:
                    entry = lru.get(rel)
                    if entry is not None:
                        lru.move_to_end(rel)
                        if now - entry[1] > TOUCH_INTERVAL:
                            lru[rel] = (entry[0], now)
                            stale.append(rel)
                        continue
                    try:
                        size = os.stat(os.path.join(self.root, rel)).st_size
                    except OSError:
                        continue
                    self._admit_locked(rel, size, now)
                elif kind == ADMITTED:
                    self._admit_locked(rel, size, now)
                else:
                    forgotten = lru.pop(rel, None)
                    if forgotten is not None:
                        self._bytes_used -= space_taken(forgotten[0], self.block_size)
        self._bump(stale, now)
