"""Who uses the cache and how well it hits, kept in bounded memory for the /ui/ pages.

The metrics hook (cache_server.metrics), which already finds each call's hits and
misses, feeds a `Usage`:

- `HitSeries`: hits and misses per lookup kind in fixed time buckets (24 h of
  10-minute buckets), so the pages show the last day's hit rate rather than a count
  since the process started. Memory is kinds x buckets whatever the traffic, and the
  series is saved as a store record now and then, so a restart keeps the day.
- `NameCounts`: counts per name (REAPI instance, Bazel HTTP instance, Turborepo
  team, OCI repository; token name) for at most a fixed number of names, the
  smallest folded into one "other" row so the totals stay exact.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

BUCKET_SECONDS = 600
DAY_BUCKETS = 144  # 24 h of 10-minute buckets
MAX_NAME_CHARS = 100  # a name longer than this is kept cut, with "…"
MAX_INSTANCES = 200  # names kept per table before the smallest are folded
MAX_CALLERS = 200
SERIES_VERSION = 1
# Where a server keeps its hit series between restarts, and how often it saves it.
SAVED_NAMESPACE = "server"
SAVED_KEY = "hit-series"
SAVE_INTERVAL = 300.0

K = TypeVar("K", bound=Hashable)


def capped(name: str, limit: int = MAX_NAME_CHARS) -> str:
    """name, cut to limit characters (the last one "…") if longer."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


@dataclass
class _Slots:
    """One kind's ring of buckets: slot i holds bucket number epochs[i]."""

    epochs: list[int]
    hits: list[int]
    misses: list[int]

    @classmethod
    def empty(cls, buckets: int) -> _Slots:
        return cls([-1] * buckets, [0] * buckets, [0] * buckets)


@dataclass(frozen=True)
class Bucket:
    start: float  # seconds since the epoch
    hits: int
    misses: int


class HitSeries:
    """Hits and misses per kind over the last `buckets` buckets of `bucket_seconds`.

    A record lands in the bucket of its time; the window at time t is the bucket
    holding t and the buckets-1 before it. Thread-safe: calls record on the event
    loop, pages read on worker threads.
    """

    def __init__(self, bucket_seconds: int = BUCKET_SECONDS, buckets: int = DAY_BUCKETS) -> None:
        self.bucket_seconds = bucket_seconds
        self.buckets = buckets
        self._kinds: dict[str, _Slots] = {}
        self._lock = threading.Lock()
        self.changed = False  # since the last to_bytes

    def bucket_of(self, when: float) -> int:
        return int(when // self.bucket_seconds)

    def record(self, kind: str, hits: int, misses: int, when: float) -> None:
        number = self.bucket_of(when)
        slot = number % self.buckets
        with self._lock:
            slots = self._kinds.get(kind)
            if slots is None:
                slots = self._kinds[kind] = _Slots.empty(self.buckets)
            held = slots.epochs[slot]
            if held != number:
                if held > number:
                    return  # older than the window the slot holds now (the clock went back)
                slots.epochs[slot], slots.hits[slot], slots.misses[slot] = number, 0, 0
            slots.hits[slot] += hits
            slots.misses[slot] += misses
            self.changed = True

    def _window(self, now: float) -> tuple[int, int]:
        newest = self.bucket_of(now)
        return newest - self.buckets + 1, newest

    def totals(self, now: float) -> dict[str, tuple[int, int]]:
        """(hits, misses) per kind within the window at now, kinds sorted."""
        first, last = self._window(now)
        found: dict[str, tuple[int, int]] = {}
        with self._lock:
            for kind, slots in self._kinds.items():
                hits = misses = 0
                for number, h, m in zip(slots.epochs, slots.hits, slots.misses, strict=True):
                    if first <= number <= last:
                        hits += h
                        misses += m
                if hits or misses:
                    found[kind] = (hits, misses)
        return dict(sorted(found.items()))

    def series(self, kind: str, now: float) -> list[Bucket]:
        """The window's buckets of one kind, oldest first (empty ones with zeros)."""
        first, last = self._window(now)
        held: dict[int, tuple[int, int]] = {}
        with self._lock:
            slots = self._kinds.get(kind)
            if slots is not None:
                for number, h, m in zip(slots.epochs, slots.hits, slots.misses, strict=True):
                    if first <= number <= last:
                        held[number] = (h, m)
        return [
            Bucket(n * self.bucket_seconds, *held.get(n, (0, 0))) for n in range(first, last + 1)
        ]

    def size(self) -> int:
        """Slots held, over all kinds (memory is proportional to it)."""
        with self._lock:
            return sum(len(s.epochs) for s in self._kinds.values())

    # ---- kept across restarts, as a store record ----
    def to_bytes(self, since: float) -> bytes:
        with self._lock:
            kinds = {
                kind: [
                    [n, h, m]
                    for n, h, m in zip(slots.epochs, slots.hits, slots.misses, strict=True)
                    if n >= 0 and (h or m)
                ]
                for kind, slots in self._kinds.items()
            }
            self.changed = False
        return json.dumps(
            {
                "version": SERIES_VERSION,
                "bucket_seconds": self.bucket_seconds,
                "since": since,
                "kinds": kinds,
            },
            separators=(",", ":"),
        ).encode()

    def load(self, data: bytes, now: float) -> float:
        """Add a saved series' buckets within the window at now; returns since when the
        saved series counted. ValueError for a record it cannot read (nothing is added)."""
        try:
            raw = json.loads(data)
            if raw.get("version") != SERIES_VERSION:
                raise ValueError(f"version {raw.get('version')!r} is not {SERIES_VERSION}")
            if raw.get("bucket_seconds") != self.bucket_seconds:
                raise ValueError("saved with another bucket width")
            since = float(raw["since"])
            rows = [
                (str(kind), int(n), int(h), int(m))
                for kind, buckets in raw["kinds"].items()
                for n, h, m in buckets
            ]
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable hit series: {exc!r}") from None
        first, last = self._window(now)
        for kind, number, hits, misses in rows:
            if first <= number <= last and hits >= 0 and misses >= 0:
                self.record(kind, hits, misses, number * self.bucket_seconds)
        return since


@dataclass
class NameCounts(Generic[K]):
    """Counts (`width` of them) per name for at most `limit` names.

    When a new name would pass the limit, the half of the names with the smallest
    totals are folded into one row (`other`), so every count still adds up.
    """

    width: int
    limit: int
    rows: dict[K, list[int]] = field(default_factory=dict)
    other: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.other = [0] * self.width

    def add(self, name: K, counts: tuple[int, ...]) -> None:
        with self._lock:
            row = self.rows.get(name)
            if row is None:
                if len(self.rows) >= self.limit:
                    self._fold()
                row = self.rows[name] = [0] * self.width
            for i, n in enumerate(counts):
                row[i] += n

    def _fold(self) -> None:
        by_total = sorted(self.rows.items(), key=lambda kv: sum(kv[1]))
        for name, row in by_total[: max(1, len(by_total) // 2)]:
            for i, n in enumerate(row):
                self.other[i] += n
            del self.rows[name]

    def top(
        self, count: int, key: Callable[[list[int]], int] = sum
    ) -> tuple[list[tuple[K, list[int]]], list[int]]:
        """The `count` names with the largest key(row), largest first (ties by name as
        text), and the sum of every other row (folded ones included)."""
        with self._lock:
            ranked = sorted(self.rows.items(), key=lambda kv: (-key(kv[1]), str(kv[0])))
            rest = list(self.other)
            shown = [(name, list(row)) for name, row in ranked[:count]]
            for _, row in ranked[count:]:
                for i, n in enumerate(row):
                    rest[i] += n
        return shown, rest


# The columns of the callers' table.
CALLS, READS, WRITES, HITS, MISSES, REFUSED = range(6)
CALLER_COLUMNS = 6


class Usage:
    """The time series and the per-name tables one server keeps (see the module doc)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.started = clock()
        self.since = self.started  # since when the hit series counts (earlier once loaded)
        self.hits = HitSeries()
        # (lookup kind, instance name) -> [hits, misses]
        self.instances: NameCounts[tuple[str, str]] = NameCounts(2, MAX_INSTANCES)
        # token name (or "(anonymous)", "(no valid token)") -> CALLER_COLUMNS counts
        self.callers: NameCounts[str] = NameCounts(CALLER_COLUMNS, MAX_CALLERS)

    def lookups(self, kind: str, instance: str, hits: int, misses: int) -> None:
        self.hits.record(kind, hits, misses, self.clock())
        self.instances.add((kind, capped(instance)), (hits, misses))

    def call(self, caller: str, access: str, hits: int, misses: int, refused: bool) -> None:
        """One call by caller; access: "read", "write" or anything else (counted as a call)."""
        self.callers.add(
            caller,
            (1, int(access == "read"), int(access == "write"), hits, misses, int(refused)),
        )

    def saved(self) -> bytes:
        return self.hits.to_bytes(self.since)

    def load(self, data: bytes) -> None:
        """Take a saved series (ValueError if unreadable)."""
        since = self.hits.load(data, self.clock())
        self.since = min(self.since, since)


@dataclass(frozen=True)
class DayFigures:
    """What the pages show of the hit series."""

    totals: dict[str, tuple[int, int]]  # (hits, misses) per kind
    series: dict[str, list[Bucket]]  # per kind, oldest first
    start: float  # what they cover starts here: the window's start or a later start of counting
    whole_day: bool


def day_figures(usage: Usage) -> DayFigures:
    now = usage.clock()
    totals = usage.hits.totals(now)
    window_start = now - usage.hits.buckets * usage.hits.bucket_seconds
    return DayFigures(
        totals,
        {kind: usage.hits.series(kind, now) for kind in totals},
        max(window_start, usage.since),
        usage.since <= window_start,
    )
