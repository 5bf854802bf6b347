"""Who uses the cache and how well it hits, kept in bounded memory for the /ui/ pages.

The metrics hook (cache_server.metrics), which already finds each call's hits and
misses, feeds a `Usage`:

- `HitSeries`: hits and misses per lookup kind in fixed time buckets (24 h of
  10-minute buckets), so the pages show the last day's hit rate rather than a count
  since the process started. Memory is kinds x buckets whatever the traffic.
- `NameCounts`: counts per name (REAPI instance, Bazel HTTP instance, Turborepo
  team, OCI repository; token name) for at most a fixed number of names, the
  smallest folded into one "other" row so the totals stay exact.

Every server process (one server, each worker of `serve --workers N`, each replica
over one S3 bucket) saves what it counted as its own store record every
SAVE_INTERVAL, and a page adds up its own figures and every other process's record
(`combined`): the day's series of every process that counted in the last day, so a
restart keeps the day, and the per-name tables of the processes still running.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

BUCKET_SECONDS = 600
DAY_BUCKETS = 144  # 24 h of 10-minute buckets
MAX_NAME_CHARS = 100  # a name longer than this is kept cut, with "…"
MAX_INSTANCES = 200  # names kept per table before the smallest are folded
MAX_CALLERS = 200
SERIES_VERSION = 2
# Where each server process keeps what it counted (SAVED_PREFIX and a name of its own),
# and how often it saves it; a record younger than LIVE_SECONDS is a running process's.
SAVED_NAMESPACE = "server"
SAVED_PREFIX = "usage/"
SAVE_INTERVAL = 30.0
LIVE_SECONDS = 3 * SAVE_INTERVAL
MAX_SAVED = 256  # records a page adds up at most

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

    # ---- saved as part of a store record ----
    def to_json(self) -> dict[str, list[list[int]]]:
        """The buckets that hold counts, per kind: [[bucket number, hits, misses], ...]."""
        with self._lock:
            return {
                kind: [
                    [n, h, m]
                    for n, h, m in zip(slots.epochs, slots.hits, slots.misses, strict=True)
                    if n >= 0 and (h or m)
                ]
                for kind, slots in self._kinds.items()
            }

    @staticmethod
    def parse_json(kinds: Any) -> list[tuple[str, int, int, int]]:
        """What to_json gave, as (kind, bucket number, hits, misses) rows; ValueError if
        it is not that."""
        try:
            return [
                (str(kind), int(n), int(h), int(m))
                for kind, buckets in kinds.items()
                for n, h, m in buckets
            ]
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"unreadable hit series: {exc!r}") from None

    def add_rows(self, rows: Iterable[tuple[str, int, int, int]], now: float) -> None:
        """Add parse_json's rows: the buckets within the window at now."""
        first, last = self._window(now)
        for kind, number, hits, misses in rows:
            if first <= number <= last and hits >= 0 and misses >= 0:
                self.record(kind, hits, misses, number * self.bucket_seconds)


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

    def to_json(self) -> list[list[object]]:
        """[[*name, *counts], ...] and, last, [*counts] of the other row."""
        with self._lock:
            return [
                [*(name if isinstance(name, tuple) else (name,)), *row]
                for name, row in self.rows.items()
            ] + [list(self.other)]

    def parse_json(
        self, rows: Any, name_parts: int
    ) -> tuple[list[tuple[tuple[str, ...], list[int]]], list[int]]:
        """What to_json gave (names of name_parts strings), as (name, counts) rows and
        the other row; ValueError if it is not that."""
        try:
            if not isinstance(rows, list) or not rows:
                raise TypeError("not a list of rows")
            parsed = [
                (tuple(map(str, row[:name_parts])), [int(n) for n in row[name_parts:]])
                for row in rows[:-1]
            ]
            rest = [int(n) for n in rows[-1]]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"unreadable counts: {exc!r}") from None
        if any(len(counts) != self.width for _, counts in parsed) or len(rest) != self.width:
            raise ValueError("counts of another width")
        return parsed, rest

    def add_rows(self, parsed: tuple[list[tuple[tuple[str, ...], list[int]]], list[int]]) -> None:
        """Add parse_json's rows."""
        rows, rest = parsed
        for name, counts in rows:
            self.add(name if len(name) > 1 else name[0], tuple(counts))  # type: ignore[arg-type]
        with self._lock:
            for i, n in enumerate(rest):
                self.other[i] += n

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
        self.since = self.started  # since when the hit series counts (earlier once combined)
        # This process's record: its pid, and a random part as pids come back.
        self.key = f"{SAVED_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
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
        """What this process counted, as its store record (see the module doc)."""
        return json.dumps(
            {
                "version": SERIES_VERSION,
                "bucket_seconds": self.hits.bucket_seconds,
                "since": self.since,
                "saved_at": self.clock(),
                "kinds": self.hits.to_json(),
                "instances": self.instances.to_json(),
                "callers": self.callers.to_json(),
            },
            separators=(",", ":"),
        ).encode()

    def add_saved(self, data: bytes) -> bool:
        """Add another process's record: its series, and its tables if it still runs;
        False if the record is past the window (its process stopped over a day ago).
        ValueError, with nothing added, for a record it cannot read."""
        now = self.clock()
        try:
            raw = json.loads(data)
            if raw.get("version") != SERIES_VERSION:
                raise ValueError(f"version {raw.get('version')!r} is not {SERIES_VERSION}")
            if raw.get("bucket_seconds") != self.hits.bucket_seconds:
                raise ValueError("saved with another bucket width")
            since, saved_at = float(raw["since"]), float(raw["saved_at"])
            kinds, instances, callers = raw["kinds"], raw["instances"], raw["callers"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"unreadable usage record: {exc}") from None
        if saved_at < now - self.hits.buckets * self.hits.bucket_seconds:
            return False
        # Every part is read before any is added.
        buckets = HitSeries.parse_json(kinds)
        instance_rows = self.instances.parse_json(instances, 2)
        caller_rows = self.callers.parse_json(callers, 1)
        self.hits.add_rows(buckets, now)
        if saved_at >= now - LIVE_SECONDS:
            self.instances.add_rows(instance_rows)
            self.callers.add_rows(caller_rows)
        self.since = min(self.since, since)
        return True


def combined(
    own: Usage, saved: Iterable[tuple[str, bytes]]
) -> tuple[Usage, list[str], list[tuple[str, str]]]:
    """own's figures plus the saved records of other processes (key, data); also the
    keys of records past the window, and (key, why) of each unreadable record."""
    total = Usage(own.clock)
    total.started, total.since = own.started, own.since
    total.add_saved(own.saved())
    expired: list[str] = []
    problems: list[tuple[str, str]] = []
    for key, data in saved:
        if key == own.key:
            continue
        try:
            if not total.add_saved(data):
                expired.append(key)
        except ValueError as exc:
            problems.append((key, str(exc)))
    return total, expired, problems


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
