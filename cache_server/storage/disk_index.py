"""The disk store's index: which entries it holds, their sizes and their LRU order.

DiskStore (storage/disk.py) asks its index three things: whether an entry is there
(finds), to note entries read or written (the LRU order, the size bound), and the
figures for metrics. Two indexes answer:

- LocalIndex, the one of a single server process: an in-memory LRU of every entry,
  built by scanning the directory (in the background when the server starts, or on
  first use); it evicts the least recently used entries past the size bound.
- SharedIndex (storage/shared_index.py), the one of each worker of
  `slipstream serve --workers N`: finds ask the filesystem, and what is read or
  written is reported to the supervisor's LocalIndex, the one accountant of the
  directory, which evicts for all of them.

While a LocalIndex loads (start_loading: `slipstream serve` does not wait for the scan,
which takes ~10 s for a million files), it answers from the files themselves and keeps
what changes meanwhile apart from the scan:
- an entry it does not know yet is looked up on disk (a stat) when it is found or read,
  and from then on kept as a live entry; entries written are live entries too;
- an entry removed or found gone is noted as removed;
- nothing is evicted (the bound is not known to be passed before the scan is counted);
- once the scan is done it is merged with these changes (merge_scan): a live entry wins
  over what the scan saw of its file, a removal drops what the scan saw, the rest is the
  scan's; live entries are the most recently used. The figures are then exact, and the
  store is brought within its bound.
A scan that fails (an unreadable directory, no file handle left) is logged and tried
again in the background, LOAD_RETRY_SECONDS apart, the changes still kept, until one
succeeds: a store whose index never loaded would never be held to its bound.

SLIPSTREAM_TEST_INDEX_GATE, for tests only: the path of a file; while it exists, a
LocalIndex whose scan is done waits before merging it (so that a test can act during
the load, however fast the scan).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import heapq
import itertools
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from slipstream.cache_server.storage.base import StoreStats

log = logging.getLogger(__name__)

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
TEST_GATE_ENV = "SLIPSTREAM_TEST_INDEX_GATE"  # see the module docstring
# Seconds between the attempts of a load that fails; the last repeats.
LOAD_RETRY_SECONDS = (1.0, 2.0, 5.0, 15.0, 60.0)
_GATE_MAX_SECONDS = 300.0


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

    # True when present() answers from memory, without a syscall per entry (once loaded).
    in_memory: bool = True

    @abc.abstractmethod
    def load(self) -> None:
        """Be ready to answer (the local index scans the directory, once); waits for a
        load started by start_loading."""

    def start_loading(self, on_loaded: Callable[[], None] | None = None) -> None:
        """Begin to load in the background and return at once; the index answers right
        meanwhile (see the module docstring). on_loaded runs (on the loading thread) once
        it is loaded."""
        self.load()
        if on_loaded is not None:
            on_loaded()

    @property
    def loaded(self) -> bool:
        """Whether the index is loaded (its figures exact, its bound held)."""
        return True

    @property
    def loading(self) -> bool:
        """Whether a load is under way: figures() counts only what changed meanwhile."""
        return False

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
        """An entry whose file was found gone or removed (before the call): dropped,
        unless a write has put the file back since."""

    @abc.abstractmethod
    def figures(self) -> tuple[int, int, int]:
        """(entries, bytes they take on disk, evictions so far)."""

    def stats(self, max_size: int | None) -> StoreStats:
        """The figures as a store reports them, saying whether the index is loading."""
        loading = self.loading  # first: the figures may be those of the load's end
        entries, used, evictions = self.figures()
        return StoreStats(entries, used, max_size, evictions, loading)

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


def ordered_scan(found: Scanned, block: int) -> tuple[collections.OrderedDict[str, _Entry], int]:
    """The scan as an LRU index, oldest access first, and the space its entries take.
    C loops over the flat lists (a sort by time alone, one dict built from zips), not
    Python code per entry: a million entries load in ~6.7 s of CPU here, where building,
    sorting and inserting an (mtime, path, size) tuple each took ~8.3."""
    # Float keys (CPython's fastest comparison); equal times keep the scan's order.
    order = sorted(range(len(found.rels)), key=found.mtimes.__getitem__)
    entries: list[_Entry] = list(zip(found.sizes, found.mtimes, strict=True))
    index = collections.OrderedDict(
        zip(map(found.rels.__getitem__, order), map(entries.__getitem__, order), strict=True)
    )
    return index, sum(space_taken(size, block) for size in found.sizes)


def merge_scan(
    scanned: collections.OrderedDict[str, _Entry],
    scanned_bytes: int,
    live: collections.OrderedDict[str, _Entry],
    removed: Iterable[str],
    block: int,
) -> int:
    """Merge into scanned (ordered_scan's index, taking scanned_bytes) what changed while
    the scan ran; returns the space the merged entries take.

    live: the entries written, found or read meanwhile, in their LRU order. Each wins
    over what the scan saw of its file (the scan may have looked before the write), and
    they stay the most recently used. removed: the entries removed or found gone
    meanwhile: what the scan saw of them goes (one written again since is live)."""
    used = scanned_bytes
    for rel in removed:
        gone = scanned.pop(rel, None)
        if gone is not None:
            used -= space_taken(gone[0], block)
    for rel, entry in live.items():
        seen = scanned.pop(rel, None)
        if seen is not None:
            used -= space_taken(seen[0], block)
        scanned[rel] = entry
        used += space_taken(entry[0], block)
    return used


def _wait_for_test_gate() -> None:
    """Wait while the file named by TEST_GATE_ENV exists (tests only; see the module
    docstring)."""
    gate = os.environ.get(TEST_GATE_ENV)
    if not gate:
        return
    deadline = time.monotonic() + _GATE_MAX_SECONDS
    while os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)


_UNLOADED, _LOADING, _LOADED = "unloaded", "loading", "loaded"


class LocalIndex(DiskIndex):
    """An in-memory LRU of every entry under root, bounded by max_size bytes of the space
    they take on a filesystem of block_size blocks (space_taken).

    Loaded on first use (record-only users never pay for the scan), or in the
    background from start_loading; while it loads it answers from the files, keeps what
    changes apart from the scan and evicts nothing (see the module docstring)."""

    def __init__(self, root: pathlib.Path, max_size: int | None, block_size: int) -> None:
        self.root = root
        self.max_size = max_size
        self.block_size = block_size
        self._lock = threading.Lock()
        # Once loaded, every entry; while loading, the live ones only (merge_scan).
        self._lru: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._bytes_used = 0
        self._evictions = 0
        self._state = _UNLOADED  # changes under the lock; _LOADED is for good
        self._done = threading.Event()  # set when a load ends, loaded or failed
        self._load_error: Exception | None = None
        self._closed = threading.Event()  # stops the attempts of a failing load
        self._on_loaded: list[Callable[[], None]] = []
        # While loading: entries removed or found gone, each with the number of its
        # removal (the count of removals then), which tells whether a file looked up
        # outside the lock may have been removed since.
        self._removed: dict[str, int] = {}
        self._removals = 0

    @property
    def loaded(self) -> bool:
        return self._state == _LOADED

    @property
    def loading(self) -> bool:
        return self._state == _LOADING

    def load(self) -> None:
        """Build the index now (in this thread) unless a load is under way: then wait
        for it. Raises what made the load fail."""
        if self._state == _LOADED:
            return
        if self._begin_loading(None):
            self._run_load(background=False)
        self._done.wait()
        if self._load_error is not None:
            raise self._load_error

    def start_loading(
        self, on_loaded: Callable[[], None] | None = None, after: threading.Event | None = None
    ) -> None:
        """As DiskIndex.start_loading; with after, the index is loading (it keeps the
        changes) at once, and its scan waits until after is set."""
        if self._begin_loading(on_loaded):
            threading.Thread(
                target=self._load_after, args=(after,), name="index-load", daemon=True
            ).start()

    def _load_after(self, after: threading.Event | None, delay: float = 0.0) -> None:
        """The background load, once after is set and delay seconds have passed
        (unless the index is closed meanwhile)."""
        if after is not None:
            after.wait()
        if not self._closed.wait(delay):
            self._run_load(background=True)

    def _begin_loading(self, on_loaded: Callable[[], None] | None) -> bool:
        """Whether the caller is to run the load (the index was not loading yet);
        on_loaded is kept for when it is loaded, or run now if it is."""
        with self._lock:
            state = self._state
            if on_loaded is not None and state != _LOADED:
                self._on_loaded.append(on_loaded)
            if state == _UNLOADED:
                self._state = _LOADING
        if on_loaded is not None and state == _LOADED:
            on_loaded()
        return state == _UNLOADED

    def _run_load(self, background: bool) -> None:
        """Load; if that fails, try again in the background until a load succeeds (the
        first failure of a load in the caller's thread is raised by load())."""
        for attempt in itertools.count():
            started = time.monotonic()
            try:
                found = scan_entries(self.root)
                _wait_for_test_gate()
                self._finish_load(found)
            except Exception as exc:
                self._load_error = exc
                self._done.set()
                delay = LOAD_RETRY_SECONDS[min(attempt, len(LOAD_RETRY_SECONDS) - 1)]
                log.error(
                    "the index of %s did not load (%s); trying again in %g s, meanwhile "
                    "finds look at the files and nothing is evicted",
                    self.root,
                    " ".join(str(exc).split()),
                    delay,
                )
                if not background:
                    threading.Thread(
                        target=self._load_after, args=(None, delay), name="index-load", daemon=True
                    ).start()
                    return
                if self._closed.wait(delay):
                    return
            else:
                self._load_error = None
                self._done.set()
                entries, used, _ = self.figures()
                log.info(
                    "index of %s loaded in %.1f s: %d entries taking %d bytes",
                    self.root,
                    time.monotonic() - started,
                    entries,
                    used,
                )
                for on_loaded in self._on_loaded:
                    try:
                        on_loaded()
                    except Exception:
                        log.exception("after the index loaded")
                self._on_loaded = []
                return

    def close(self) -> None:
        self._closed.set()

    def _finish_load(self, found: Scanned) -> None:
        """Merge the scan with what changed while it ran; the index is then loaded. The
        scan's own index is built outside the lock (~2 s for a million entries): under
        it, only the changes are merged in."""
        scanned, scanned_bytes = ordered_scan(found, self.block_size)
        with self._lock:
            block = self.block_size
            self._bytes_used = merge_scan(scanned, scanned_bytes, self._lru, self._removed, block)
            self._lru = scanned
            self._removed = {}
            self._state = _LOADED
            self._evict_locked(keep=None)

    def present(self, rels: Iterable[str], sizes: Iterable[int] | None = None) -> list[bool]:
        """Under one lock and one clock read (finds carry thousands); the access-time
        bumps, at most one a minute per entry, come after."""
        if self._state != _LOADED:
            if self._state == _LOADING:
                return self._present_while_loading(list(rels), sizes)
            self.load()
        now = time.time()
        found: list[bool] = []
        stale: list[str] = []
        lru = self._lru  # not replaced once loaded
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

    def _present_while_loading(self, rels: list[str], sizes: Iterable[int] | None) -> list[bool]:
        """present() before the scan is merged: an entry not known yet is looked up on
        disk (outside the lock) and, if its file is there, becomes a live entry, unless
        it was removed meanwhile."""
        wanted = None if sizes is None else list(itertools.islice(sizes, len(rels)))
        wants: list[int | None] = [None] * len(rels) if wanted is None else [*wanted]
        removals = self._removals  # a removal numbered past this may follow a lookup
        now = time.time()
        found: list[bool] = []
        unknown: list[int] = []
        stale: list[str] = []
        with self._lock:
            if self._state == _LOADED:
                merged = True
            else:
                merged = False
                lru = self._lru
                for i, (rel, want) in enumerate(zip(rels, wants, strict=True)):
                    entry = lru.get(rel)
                    if entry is None:
                        unknown.append(i)
                        found.append(False)
                    else:
                        found.append(self._use_locked(lru, rel, entry, want, now, stale))
        if merged:  # the load ended since the caller looked
            return self.present(rels, wanted)
        looked: list[tuple[int, int, float]] = []  # (position, size, mtime) of files there
        for i in unknown:
            try:
                st = os.stat(os.path.join(self.root, rels[i]))
            except OSError:
                continue
            looked.append((i, st.st_size, st.st_mtime))
        if looked:
            with self._lock:
                merged = self._state == _LOADED
                lru = self._lru
                for i, size, mtime in looked:
                    rel = rels[i]
                    entry = lru.get(rel)
                    if entry is None:
                        # Merged meanwhile, yet not in the index: it went (or was made by
                        # another process after the scan); removed since the lookup: gone.
                        if merged or self._removed.get(rel, -1) > removals:
                            continue
                        entry = lru[rel] = (size, mtime)
                        self._bytes_used += space_taken(size, self.block_size)
                    found[i] = self._use_locked(lru, rel, entry, wants[i], now, stale)
        self._bump(stale, now)
        return found

    @staticmethod
    def _use_locked(
        lru: collections.OrderedDict[str, _Entry],
        rel: str,
        entry: _Entry,
        want: int | None,
        now: float,
        stale: list[str],
    ) -> bool:
        """Whether an indexed entry is held with the size wanted; if so it becomes the
        most recently used (and stale, for an access-time bump, if due)."""
        if want is not None and entry[0] != want:
            return False
        lru.move_to_end(rel)
        if now - entry[1] > TOUCH_INTERVAL:
            lru[rel] = (entry[0], now)
            stale.append(rel)
        return True

    def _bump(self, rels: list[str], now: float) -> None:
        """Set the files' modification times: the LRU order survives a restart."""
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):
                os.utime(os.path.join(self.root, rel), (now, now))

    def may_hold(self, rel: str, size: int) -> bool:
        state = self._state  # before the entry: the load's end replaces the index
        if state == _UNLOADED:
            self.load()
            state = _LOADED
        entry = self._lru.get(rel)  # a dict read: atomic under the GIL
        if entry is None:
            return state != _LOADED  # not known yet: the file tells
        return entry[0] == size

    def touched(self, rels: Sequence[str]) -> None:
        if self._state != _UNLOADED or self.max_size is not None:
            self.present(rels)  # a record-only reader need not index

    def forget(self, rel: str) -> None:
        if self._state == _UNLOADED:
            self.load()
        with self._lock:
            self._forget_locked(rel)

    def _forget_locked(self, rel: str) -> None:
        # Under the lock, which a write takes to admit its file once in place: a file
        # there now was put back by a write since the caller saw it gone, and stays.
        if os.path.lexists(os.path.join(self.root, rel)):
            return
        if self._state != _LOADED:
            self._removals += 1
            self._removed[rel] = self._removals
        entry = self._lru.pop(rel, None)
        if entry is not None:
            self._bytes_used -= space_taken(entry[0], self.block_size)

    def admit(self, rel: str, size: int) -> None:
        if self._state == _UNLOADED:
            if self.max_size is None:
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
        """Evict the least recently used entries past the bound; not while loading, when
        what the directory takes is not known yet (the load ends with this)."""
        if self.max_size is None or self._state != _LOADED:
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
        """While loading: the live entries alone (see loading)."""
        if self._state == _UNLOADED:
            self.load()
        with self._lock:
            return len(self._lru), self._bytes_used, self._evictions

    def largest(self, count: int) -> list[tuple[str, int]] | None:
        """None while loading: the sizes of most entries are not known yet."""
        if self._state != _LOADED:
            if self._state == _LOADING:
                return None
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
        the index lacks (its admission lost with a worker that died, or not known yet
        while the index loads) is looked up on disk."""
        if self._state == _UNLOADED:
            self.load()
        now = time.time()
        stale: list[str] = []
        with self._lock:
            lru = self._lru  # under the lock: the load's end replaces it
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
                    self._forget_locked(rel)
        self._bump(stale, now)
