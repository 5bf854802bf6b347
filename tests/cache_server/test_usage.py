"""The pages' figures in bounded memory (cache_server.usage): the bucketed hit series and
the per-name tables, as properties; and the decoded history the pages keep."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.cache_server.http_endpoint import http_method
from slipstream.cache_server.metrics import access_of
from slipstream.cache_server.services.ui_history import HistoryCache
from slipstream.cache_server.storage.memory import MemoryStore
from slipstream.cache_server.usage import (
    LIVE_SECONDS,
    HitSeries,
    NameCounts,
    Usage,
    capped,
    combined,
)
from slipstream.splitter import history
from slipstream.splitter.history import Run, Sample

KINDS = st.sampled_from(["ac", "cas", "ccache", "oci_blobs"])
BUCKET, BUCKETS = 60, 12
# (seconds after the previous record, kind, hits, misses): time moves forward, by up to
# a few windows at once
RECORDS = st.lists(
    st.tuples(st.integers(0, 3 * BUCKET * BUCKETS), KINDS, st.integers(0, 50), st.integers(0, 50)),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(RECORDS, st.integers(0, 3 * BUCKET * BUCKETS), st.integers(0, 10**9))
def test_totals_are_the_sum_of_what_was_recorded_within_the_window(
    records: list[tuple[int, str, int, int]], later: int, start: int
) -> None:
    series = HitSeries(BUCKET, BUCKETS)
    when = start
    recorded = []
    for step, kind, hits, misses in records:
        when += step
        series.record(kind, hits, misses, when)
        recorded.append((when, kind, hits, misses))
    now = when + later
    newest = now // BUCKET
    expected: dict[str, list[int]] = {}
    for at, kind, hits, misses in recorded:
        if newest - BUCKETS < at // BUCKET <= newest:
            row = expected.setdefault(kind, [0, 0])
            row[0] += hits
            row[1] += misses
    assert series.totals(now) == {k: tuple(v) for k, v in sorted(expected.items()) if any(v)}
    for kind, (hits, misses) in series.totals(now).items():
        buckets = series.series(kind, now)
        assert len(buckets) == BUCKETS
        assert sum(b.hits for b in buckets) == hits and sum(b.misses for b in buckets) == misses
        assert [b.start for b in buckets] == [
            (newest - BUCKETS + 1 + i) * BUCKET for i in range(BUCKETS)
        ]
    # Memory: a fixed ring per kind, whatever the number of records.
    assert series.size() <= 4 * BUCKETS


@settings(max_examples=100, deadline=None)
@given(RECORDS, st.integers(0, 3 * 600), st.lists(st.tuples(st.text(max_size=3), KINDS)))
def test_saved_records_add_up_to_the_processes_totals(
    records: list[tuple[int, str, int, int]],
    later: int,
    calls: list[tuple[str, str]],
) -> None:
    """Two processes' figures, one combined with the other's saved record, are the sum of
    both: the day's series, and the tables of a process that still runs."""
    clock = [1_000_000.0]
    one, two = Usage(lambda: clock[0]), Usage(lambda: clock[0])
    for i, (step, kind, hits, misses) in enumerate(records):
        clock[0] += step % 600
        (one if i % 2 else two).lookups(kind, "inst", hits, misses)
    for i, (caller, _) in enumerate(calls):
        (one if i % 2 else two).call(caller, "read", 1, 0, False)
    saved_two = two.saved()
    clock[0] += later
    total, expired, problems = combined(one, [(two.key, saved_two), (one.key, one.saved())])
    assert (expired, problems) == ([], [])
    now = clock[0]
    ones, twos = one.hits.totals(now), two.hits.totals(now)
    expected = {
        kind: tuple(
            a + b for a, b in zip(ones.get(kind, (0, 0)), twos.get(kind, (0, 0)), strict=True)
        )
        for kind in set(ones) | set(twos)
    }
    assert total.hits.totals(now) == dict(sorted(expected.items()))
    shown, rest = total.callers.top(1000)
    reads = sum(row[1] for _, row in shown) + rest[1]
    twos_reads = len(calls) // 2 + len(calls) % 2  # the even-numbered calls
    assert reads == len(calls) - (0 if later <= LIVE_SECONDS else twos_reads)


def test_a_record_past_the_day_is_expired_and_adds_nothing() -> None:
    clock = [1_000_000.0]
    old = Usage(lambda: clock[0])
    old.lookups("ac", "i", 5, 0)
    saved = old.saved()
    clock[0] += 2 * 24 * 3600
    now = Usage(lambda: clock[0])
    total, expired, problems = combined(now, [(old.key, saved)])
    assert expired == [old.key] and problems == []
    assert total.hits.totals(clock[0]) == {}


def test_a_clock_that_goes_back_past_the_window_records_nothing_stale() -> None:
    series = HitSeries(BUCKET, BUCKETS)
    series.record("ac", 5, 0, 10 * BUCKET * BUCKETS)
    series.record("ac", 7, 0, 9 * BUCKET * BUCKETS)  # the same slot, a window earlier
    assert series.totals(10 * BUCKET * BUCKETS) == {"ac": (5, 0)}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"version": 2}',
        b'{"version": 99, "kinds": {}}',
        b'{"version": 2, "bucket_seconds": 600, "since": 1, "saved_at": 1e9,'
        b' "kinds": {"ac": [[1666666, 1, 1]]}, "instances": [[0, 0]], "callers": "x"}',
    ],
)
def test_an_unreadable_record_is_refused_and_adds_nothing(data: bytes) -> None:
    usage = Usage(lambda: 1e9)
    with pytest.raises(ValueError):
        usage.add_saved(data)
    assert usage.hits.totals(1e9) == {}
    assert usage.instances.top(10) == ([], [0, 0])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.text(max_size=3), st.integers(0, 9), st.integers(0, 9)), max_size=300),
    st.integers(1, 20),
    st.integers(0, 30),
)
def test_name_counts_stay_bounded_and_add_up(
    adds: list[tuple[str, int, int]], limit: int, shown: int
) -> None:
    counts: NameCounts[str] = NameCounts(2, limit)
    for name, a, b in adds:
        counts.add(name, (a, b))
        assert len(counts.rows) <= limit
    top, rest = counts.top(shown)
    assert len(top) <= shown
    assert [sum(row) for _, row in top] == sorted((sum(row) for _, row in top), reverse=True)
    totals = [sum(a for _, a, _ in adds), sum(b for _, _, b in adds)]
    assert [sum(row[i] for _, row in top) + rest[i] for i in (0, 1)] == totals


def test_a_name_seen_while_others_were_few_stays_exact() -> None:
    counts: NameCounts[str] = NameCounts(1, 4)
    for name in ["big"] * 50 + [f"small-{i}" for i in range(20)]:
        counts.add(name, (1,))
    top, rest = counts.top(1)
    assert top == [("big", [50])] and rest == [20]


def test_long_names_are_cut() -> None:
    usage = Usage(clock=lambda: 1_000_000.0)
    usage.lookups("ac", "x" * 10_000, 1, 0)
    (((kind, name), _),), _ = usage.instances.top(1)
    assert kind == "ac" and name == capped("x" * 10_000) and len(name) == 100


def _upload(store: MemoryStore, n: int, tests: int, suite: str = "suite") -> None:
    results = {f"t{i}": Sample(1.0, False) for i in range(tests)}
    history.append_run(store, suite, Run(f"r{n}", 10**18 + n, results))


def test_the_pages_read_each_upload_once_and_keep_a_bounded_number_of_results() -> None:
    store = MemoryStore()
    for n in range(10):
        _upload(store, n, tests=100)
    cache = HistoryCache(store, max_results=450)
    runs, _ = cache.load_runs("suite")
    assert [r.run_id for r in runs] == [f"r{n}" for n in range(10)]
    assert cache.records_read == 10
    assert cache.kept_results() == 400  # the newest 4 uploads fit

    runs, _ = cache.load_runs("suite")
    assert len(runs) == 10 and cache.records_read == 16  # the 6 older ones again

    big = HistoryCache(store, max_results=10_000)
    big.load_runs("suite")
    assert big.records_read == 10
    assert big.load_runs("suite")[0] == runs and big.records_read == 10  # nothing read
    _upload(store, 10, tests=100)
    runs, _ = big.load_runs("suite")
    assert runs[-1].run_id == "r10" and big.records_read == 11  # only the new upload
    for n in range(11, 120):
        _upload(store, n, tests=100)
    big.load_runs("suite")
    assert big.kept_results() <= 10_000


def test_an_upload_kept_as_it_is_stored_is_not_read_back() -> None:
    # The split service stores an upload and keeps it decoded: its next plan reads none.
    store = MemoryStore()
    _upload(store, 0, tests=100)
    cache = HistoryCache(store, max_results=300)
    cache.load_runs("suite")
    for n in (1, 2):
        sent = Run(f"r{n}", 10**18 + n, {f"t{i}": Sample(2.0, False) for i in range(100)})
        cache.add("suite", history.store_run(store, "suite", sent), sent)
    runs, _ = cache.load_runs("suite")
    assert [r.run_id for r in runs] == ["r0", "r1", "r2"] and runs[-1] is sent
    assert cache.records_read == 1  # r0, at the first load
    assert cache.kept_results() == 300
    other = HistoryCache(store)  # what reading the records gives
    assert [r.tests for r in other.load_runs("suite")[0]] == [r.tests for r in runs]
    sent = Run("r3", 10**18 + 3, {f"t{i}": Sample(3.0, False) for i in range(100)})
    cache.add("suite", history.store_run(store, "suite", sent), sent)
    assert cache.kept_results() == 300  # within the budget: the newest three


def test_suites_read_in_turn_share_the_budget_rather_than_push_each_other_out() -> None:
    store = MemoryStore()
    for n in range(6):
        _upload(store, n, tests=100, suite="a")
        _upload(store, n, tests=100, suite="b")
    cache = HistoryCache(store, max_results=800)
    for suite in ("a", "b"):  # an overview: every suite in turn
        cache.load_runs(suite)
    assert cache.records_read == 12 and cache.kept_results() == 800
    for suite in ("a", "b"):
        runs, _ = cache.load_runs(suite)
        assert [r.run_id for r in runs] == [f"r{n}" for n in range(6)]
    assert cache.records_read == 12 + 4  # the 2 oldest of each, which their share left out
    assert cache.kept_results() == 800


@pytest.mark.parametrize(
    ("method", "access"),
    [
        ("/build.bazel.remote.execution.v2.ActionCache/GetActionResult", "read"),
        ("/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult", "write"),
        ("/google.bytestream.ByteStream/Write", "write"),
        ("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", "other"),
        (http_method("invalid", "GET"), "other"),  # a path no protocol serves
    ],
)
def test_a_call_counts_as_a_read_or_a_write_by_the_scope_its_method_needs(
    method: str, access: str
) -> None:
    assert access_of(method) == access
