"""One disk store directory served by several processes (`slipstream serve --workers N`).

The supervisor keeps the one LocalIndex of the directory (storage/disk_index.py): it
scans the directory at start, counts the bytes used, evicts past the size bound and
counts evictions. It is the accountant. The workers serve while it loads: they need
no index to answer, and what they report meanwhile the accountant keeps apart from
its scan and merges with it (as one server's index does), so its figures are exact
once loaded; until then it says it is loading and evicts nothing. Each worker
answers from the filesystem (SharedIndex): a find stats the blob's file, whose size
tells its digest's size, and a read opens it. What a worker puts in place, reads or
finds gone it reports to the accountant over a socket, in batches sent by a thread of
its own (Reporter): no call waits for the accountant. The accountant publishes its
figures (entries, bytes, evictions, whether it is loading) in shared memory, where
every worker's pages and start-up line read them.

What follows from reporting after the fact:
- The bound holds once the reports are in (a few milliseconds): writes in flight
  may take the directory past it for that long.
- An entry read again within REFRESH_INTERVAL of its last report is not reported
  again by that worker: its place in the LRU is as of a second ago at most. A find
  of it in that time is answered from the worker's memory, without a stat call:
  the entry was the accountant's most recently used a second ago, so it is evicted
  that soon only if more than the whole bound is written within that second.
- An entry the accountant evicts while a worker writes it anew can lose the new
  file; its admission then counts bytes that are not there until a read finds it
  gone. An entry read that the accountant does not know (its admission lost with a
  worker that died) is looked up on disk and admitted.

The line to the supervisor also carries the workers' start-up messages and their
call counts (for /metrics), as lines of text:

    +REL SIZE   admitted: a file put in place, SIZE bytes on disk
    =REL        touched: an entry read or found
    -REL        forgotten: an entry found gone or removed
    #JSON       the worker's store call counts so far ({"operations":..., "s3":...})
    !TEXT       a message for the supervisor (ready, error)
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from slipstream.cache_server.storage.base import StoreStats
from slipstream.cache_server.storage.disk_index import (
    ADMITTED,
    FORGOTTEN,
    TOUCHED,
    DiskIndex,
    LocalIndex,
)

log = logging.getLogger(__name__)

REPORT_DELAY = 0.002  # seconds a report waits for others to go with it
REFRESH_INTERVAL = 1.0  # an entry read again sooner is not reported again
COUNTS_INTERVAL = 1.0  # seconds between reports of a worker's call counts
# Entries a worker remembers as reported (~250 bytes each): past it, those older than
# REFRESH_INTERVAL go, or all of them if half as many are newer.
_RECENT_MAX = 50_000

# The accountant's figures in shared memory: a multiprocessing RawArray of FIGURES
# 64-bit integers, written by the supervisor alone.
Figures = Any
ENTRIES, BYTES_USED, EVICTIONS, LOADING = range(4)
FIGURES = 4


class Reporter:
    """A worker's line to its supervisor: lines queued by any thread, sent in batches
    by a thread of its own. on_lost runs (on that thread) when the supervisor is gone."""

    def __init__(self, connection: socket.socket, on_lost: Callable[[], None]) -> None:
        self._connection = connection
        self._on_lost = on_lost
        self._queue: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self.counts: Callable[[], dict[str, dict[str, int]]] | None = None
        self._sender = threading.Thread(target=self._send_loop, name="reports", daemon=True)
        self._sender.start()
        threading.Thread(target=self._watch, name="supervisor-watch", daemon=True).start()

    def send(self, line: str) -> None:
        """Queue one line (ending in a newline); never blocks."""
        self._queue.append(line)
        if not self._wake.is_set():
            self._wake.set()

    def _send_loop(self) -> None:
        sent_counts: dict[str, dict[str, int]] | None = None
        next_counts = time.monotonic() + COUNTS_INTERVAL
        while True:
            woken = self._wake.wait(COUNTS_INTERVAL)
            if woken and not self._closing:
                time.sleep(REPORT_DELAY)
            self._wake.clear()
            parts = []
            with contextlib.suppress(IndexError):
                while True:
                    parts.append(self._queue.popleft())
            if self.counts is not None and (self._closing or time.monotonic() >= next_counts):
                next_counts = time.monotonic() + COUNTS_INTERVAL
                counts = self.counts()
                if counts != sent_counts:
                    parts.append(f"#{json.dumps(counts, separators=(',', ':'))}\n")
                    sent_counts = counts
            if parts:
                try:
                    self._connection.sendall("".join(parts).encode())
                except OSError:
                    return
            if self._closing and not self._queue:
                return

    def _watch(self) -> None:
        with contextlib.suppress(OSError):
            while self._connection.recv(4096):
                pass
        if not self._closing:
            self._on_lost()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop sending."""
        self._closing = True
        self._wake.set()
        self._sender.join(timeout)


class SharedIndex(DiskIndex):
    """A worker's view of a directory that the supervisor's accountant keeps."""

    in_memory = False

    def __init__(self, root: pathlib.Path, reporter: Reporter, figures: Figures) -> None:
        self.root = root
        # Paths looked up from the directory's descriptor: a shorter walk than from /
        # (a stat of a missing blob took 4.7 us, not 10.7, on this VM).
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self._reporter = reporter
        self._figures = figures
        # Entries this worker reported lately: rel -> (when, size on disk or -1). Store
        # threads and the event loop change it at once: under the lock (a walk of it
        # meeting another thread's change fails "dictionary changed size during
        # iteration", even a walk in C, which a garbage collection can interrupt).
        self._recent: dict[str, tuple[float, int]] = {}
        self._recent_lock = threading.Lock()

    def load(self) -> None:
        pass  # the accountant's: a worker answers from the files

    @property
    def loaded(self) -> bool:
        return not self.loading

    @property
    def loading(self) -> bool:
        """Whether the accountant's index is loading."""
        return bool(self._figures[LOADING])

    def present(self, rels: Iterable[str], sizes: Iterable[int] | None = None) -> list[bool]:
        """An entry this worker reported within REFRESH_INTERVAL is taken as held (the
        accountant made it its most recently used then); any other, the file tells."""
        found: list[bool] = []
        refreshed: list[tuple[str, int]] = []
        expected: Iterable[int | None] = itertools.repeat(None) if sizes is None else sizes
        root_fd = self._root_fd
        recent = self._recent
        cutoff = time.monotonic() - REFRESH_INTERVAL
        for rel, want in zip(rels, expected, strict=False):  # expected may be endless
            seen = recent.get(rel)
            if seen is not None and seen[0] > cutoff and (want is None or seen[1] == want):
                found.append(True)
                continue
            try:
                size = os.stat(rel, dir_fd=root_fd).st_size
            except OSError:
                found.append(False)
                continue
            held = want is None or size == want
            found.append(held)
            if held:
                refreshed.append((rel, size))
        self._report(refreshed)
        return found

    def may_hold(self, rel: str, size: int) -> bool:
        return True  # the file tells, when it is read: no stat call before

    def touched(self, rels: Sequence[str]) -> None:
        self._report([(rel, -1) for rel in rels])

    def _report(self, entries: list[tuple[str, int]]) -> None:
        """Report entries used (with their size on disk, or -1 if not known), each at
        most once per REFRESH_INTERVAL."""
        now = time.monotonic()
        cutoff = now - REFRESH_INTERVAL
        lines = []
        with self._recent_lock:
            recent = self._recent
            for rel, size in entries:
                seen = recent.get(rel)
                if seen is not None and seen[0] > cutoff:
                    continue
                recent[rel] = (now, size)
                lines.append(f"{TOUCHED}{rel}\n")
            if len(recent) > _RECENT_MAX:
                kept = {rel: seen for rel, seen in recent.items() if seen[0] > cutoff}
                self._recent = kept if len(kept) <= _RECENT_MAX // 2 else {}
        if lines:
            self._reporter.send("".join(lines))

    def admit(self, rel: str, size: int) -> None:
        with self._recent_lock:
            self._recent[rel] = (time.monotonic(), size)
        self._reporter.send(f"{ADMITTED}{rel} {size}\n")

    def forget(self, rel: str) -> None:
        with self._recent_lock:
            self._recent.pop(rel, None)
        self._reporter.send(f"{FORGOTTEN}{rel}\n")

    def figures(self) -> tuple[int, int, int]:
        figures = self._figures
        return figures[ENTRIES], figures[BYTES_USED], figures[EVICTIONS]

    def close(self) -> None:
        self._reporter.close()
        with contextlib.suppress(OSError):
            os.close(self._root_fd)


def parse_reports(lines: Iterable[bytes]) -> list[tuple[str, str, int]]:
    """The index reports among a worker's lines (see the module docstring)."""
    reports = []
    for line in lines:
        kind = line[:1]
        if kind == b"=":
            reports.append((TOUCHED, line[1:].decode(), 0))
        elif kind == b"+":
            rel, _, size = line[1:].rpartition(b" ")
            reports.append((ADMITTED, rel.decode(), int(size)))
        elif kind == b"-":
            reports.append((FORGOTTEN, line[1:].decode(), 0))
    return reports


class Accountant:
    """The supervisor's side: reads every worker's line, applies what they report to
    the one index (None for a store with no disk), publishes the figures."""

    def __init__(self, index: LocalIndex | None, max_size: int | None, figures: Figures) -> None:
        self.index = index
        self.max_size = max_size
        self._figures = figures
        self._lock = threading.Lock()
        self._publishing = threading.Lock()  # the last to publish read the latest figures
        self._counts: dict[int, dict[str, dict[str, int]]] = {}  # by worker
        self._retired: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.publish()

    def publish(self) -> None:
        """Put the index's figures in shared memory (after reports, and once loaded)."""
        if self.index is None:
            return
        with self._publishing:
            stats = self.index.stats(self.max_size)
            self._figures[ENTRIES] = stats.blobs
            self._figures[BYTES_USED] = stats.bytes_used
            self._figures[EVICTIONS] = stats.evictions
            self._figures[LOADING] = int(stats.loading)

    def follow(
        self, worker: int, connection: socket.socket, on_message: Callable[[int, str], None]
    ) -> threading.Thread:
        """Read a worker's line until it closes (then close it), on a thread of its own;
        on_message gets its ! messages."""
        thread = threading.Thread(
            target=self._read, args=(worker, connection, on_message), daemon=True
        )
        thread.start()
        return thread

    def _read(
        self, worker: int, connection: socket.socket, on_message: Callable[[int, str], None]
    ) -> None:
        pending = b""
        while True:
            try:
                data = connection.recv(1 << 18)
            except OSError:
                data = b""
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            if self.index is not None:
                try:
                    reports = parse_reports(lines)
                    if reports:
                        self.index.apply(reports)
                except Exception:
                    log.exception("applying a worker's reports failed")
                self.publish()
            for line in lines:
                if line[:1] == b"#":
                    with self._lock, contextlib.suppress(ValueError):
                        self._counts[worker] = json.loads(line[1:])
                elif line[:1] == b"!":
                    on_message(worker, line[1:].decode(errors="replace"))
        connection.close()
        with self._lock:  # its counts stay in the totals
            for kind, counts in self._counts.pop(worker, {}).items():
                self._retired[kind].update(counts)

    def _total(self, kind: str) -> dict[str, int]:
        with self._lock:
            total = collections.Counter(self._retired[kind])
            for counts in self._counts.values():
                total.update(counts.get(kind, {}))
        return dict(total)

    # ---- what the metrics ask of a store (metrics.StoreCollector) ----
    def stats(self) -> StoreStats | None:
        if self.index is None:
            return None
        return self.index.stats(self.max_size)

    def operation_counts(self) -> dict[str, int]:
        return self._total("operations")

    def request_counts(self) -> dict[str, int]:
        return self._total("s3")
