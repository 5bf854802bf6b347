"""Timing history and the estimates made from it.

Every upload is its own append-only record in the store's "timings" namespace, under
``{suite}/{time_ns:020d}-{uuid}``, so concurrent uploads never overwrite each other.
Uploads that carry the same run id (the N shards of one CI run) merge into one run.
``estimate`` (pure) turns runs into a predicted time per test: a percentile of its last
K runs, and for a test with no history the median of its file, else of its directory,
else of the whole suite.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from slipstream.splitter.ids import (
    JUnitCase,
    directories_of,
    file_of,
    files_of,
    match_cases,
    node_id,
    node_ids,
)

NAMESPACE = "timings"
RECORD_VERSION = 1
DEFAULT_LAST_RUNS = 10
DEFAULT_PERCENTILE = 50.0
# JUnit rounds to the millisecond, so "0.000" means "under half a millisecond".
MIN_TEST_SECONDS = 0.0005
# A skipped test that took at least this long ran (an xfail, or a skip raised after a
# costly set-up) and its time is timing data; one skipped up front took ~0.
MIN_SKIPPED_SECONDS = 0.001


_INF = float("inf")
_SUITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def ran(outcome: str, seconds: float | None) -> bool:
    """Whether a case's time is timing data: it has one, and it ran (see MIN_SKIPPED_SECONDS)."""
    return seconds is not None and (outcome != "skipped" or seconds >= MIN_SKIPPED_SECONDS)


class HistoryError(ValueError):
    """A suite name the history cannot hold."""


class RecordInfo(Protocol):
    @property
    def key(self) -> str: ...


class RecordStore(Protocol):
    """What the history needs of a store: named records, appended and listed.

    The cache server's stores provide it; so can anything else that keeps bytes by key.
    """

    def get_record(self, namespace: str, key: str) -> bytes | None: ...

    def put_record(
        self, namespace: str, key: str, value: bytes, *, overwrite: bool = True
    ) -> bool: ...

    def list_records(self, namespace: str, prefix: str = "") -> Sequence[RecordInfo]: ...


class Sample(NamedTuple):
    """One timing of a test (a tuple, made faster than a frozen dataclass: a history
    holds one per test and run)."""

    seconds: float
    failed: bool


_new_tuple = tuple.__new__


@dataclass(slots=True)
class Run:
    """The timings of one run (possibly merged from several shard uploads)."""

    run_id: str | None
    created_ns: int
    tests: dict[str, Sample] = field(default_factory=dict)
    file_costs: dict[str, float] = field(default_factory=dict)
    startup: float | None = None  # seconds a shard spends outside files and tests
    groups: dict[str, str] = field(default_factory=dict)  # test -> group that shares a shard


@dataclass(frozen=True, slots=True)
class Estimates:
    """Predicted seconds per test and per file; ``from_history`` is False when guessed."""

    tests: dict[str, float]
    file_costs: dict[str, float]
    from_history: bool
    known: int  # how many of the tests had their own history
    startup: float = 0.0


def _merge_sample(old: Sample | None, new: Sample) -> Sample:
    # A test seen twice in one run (a rerun) counts once: a pass beats a failure, and
    # between two of a kind the longer one (what a runner really waited for).
    if old is None or (old.failed and not new.failed):
        return new
    if new.failed and not old.failed:
        return old
    return new if new.seconds > old.seconds else old


def run_from_cases(
    cases: Iterable[JUnitCase],
    *,
    run_id: str | None = None,
    created_ns: int | None = None,
    file_costs: Mapping[str, float] | None = None,
    candidates: Iterable[str] | None = None,
    startup: float | None = None,
) -> Run:
    """One run from JUnit cases. Cases that did not run (no time, or skipped up front)
    are not timings; an xfail, or a skip after a costly set-up, is (``ran``).

    With candidates (the ids the runner uses), cases are mapped onto them (see
    ``ids.match_cases``; a file or class candidate gets the sum of its cases);
    otherwise each case is keyed by its best-guess node id.
    """
    cases = list(cases)
    timed = [  # ran(), inlined: 100,000 calls add up
        c
        for c in cases
        if c.time is not None and (c.outcome != "skipped" or c.time >= MIN_SKIPPED_SECONDS)
    ]
    run = Run(run_id, time.time_ns() if created_ns is None else created_ns, startup=startup)
    run.file_costs.update(file_costs or {})
    if candidates is None:
        for case in cases:
            if case.group:
                run.groups[node_id(case)] = case.group
        for case, key in zip(timed, node_ids(timed), strict=True):
            assert case.time is not None
            run.tests[key] = _merge_sample(
                run.tests.get(key), Sample(case.time, case.outcome == "failed")
            )
        return run
    wanted = list(candidates)
    grouped = [c for c in cases if c.group]
    for candidate, matched in match_cases(grouped, wanted).items() if grouped else ():
        run.groups[candidate] = matched[0].group or ""
    for candidate, matched in match_cases(timed, wanted).items():
        if len(matched) == 1:  # the common case: fsum and any of one are the one
            case = matched[0]
            assert case.time is not None
            # Sample(...) without the Python frame of a named tuple's __new__
            run.tests[candidate] = _new_tuple(Sample, (case.time, case.outcome == "failed"))
            continue
        samples: list[tuple[object, Sample]] = []
        for case in matched:
            assert case.time is not None
            names = (case.classname, case.name, case.file)
            samples.append((names, Sample(case.time, case.outcome == "failed")))
        run.tests[candidate] = sample_of_cases(samples)
    return run


def sample_of_cases(samples: Iterable[tuple[object, Sample]]) -> Sample:
    """A candidate's sample from its cases' samples, each given with what names the
    case (its classname, name and file): a case seen twice (a rerun) counts once, as
    ``_merge_sample`` keeps it; distinct cases (a file's, a class's) add up."""
    per_case: dict[object, Sample] = {}
    for names, sample in samples:
        per_case[names] = _merge_sample(per_case.get(names), sample)
    return Sample(
        math.fsum(s.seconds for s in per_case.values()),
        any(s.failed for s in per_case.values()),
    )


def merge_runs(runs: Iterable[Run]) -> list[Run]:
    """Runs with the same run id merged into one; oldest first."""
    merged: dict[str, Run] = {}
    alone: list[Run] = []
    for run in sorted(runs, key=lambda r: r.created_ns):
        if run.run_id is None:
            alone.append(run)
            continue
        into = merged.setdefault(run.run_id, Run(run.run_id, run.created_ns))
        if into.tests:
            for test, sample in run.tests.items():
                into.tests[test] = _merge_sample(into.tests.get(test), sample)
        else:  # the run's first upload: _merge_sample(None, s) is s
            into.tests.update(run.tests)
        into.file_costs.update(run.file_costs)
        if run.startup is not None:
            into.startup = max(into.startup or 0.0, run.startup)
        into.groups.update(run.groups)
    return sorted([*merged.values(), *alone], key=lambda r: (r.created_ns, r.run_id or ""))


def groups_of(runs: Sequence[Run], *, last_runs: int = DEFAULT_LAST_RUNS) -> dict[str, str]:
    """Test -> group from the recent runs, the newest run winning."""
    return _groups_of_merged(merge_runs(runs), last_runs)


def _groups_of_merged(merged: Sequence[Run], last_runs: int) -> dict[str, str]:
    """groups_of of runs already merged (merge_runs)."""
    groups: dict[str, str] = {}
    for run in merged[-last_runs:]:
        groups.update(run.groups)
    return groups


def _percentile(values: Sequence[float], pct: float) -> float:
    if len(values) == 1:
        one = values[0]
        return one + (one - one) * 0.0  # the interpolation below, without the sort
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * pct / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _median(values: Sequence[float]) -> float:
    return _percentile(values, 50.0)


def estimate(
    tests: Iterable[str],
    runs: Sequence[Run],
    *,
    last_runs: int = DEFAULT_LAST_RUNS,
    percentile: float = DEFAULT_PERCENTILE,
) -> Estimates:
    """Predicted seconds for each test, from the last ``last_runs`` runs that timed it.

    A test's estimate is the given percentile of its samples (failed samples only when
    it never passed). A file path gets the sum of its tests. Without history of its own:
    the median of its file's estimates, else its directory's (innermost first), else the
    whole suite's. With no history at
    all every test gets 1 second and ``from_history`` is False.
    """
    return Estimator(runs, last_runs=last_runs, percentile=percentile).estimate(tests)


def _own_of_one_sample(seconds: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Each test's own estimate from its one sample's seconds:
    max(MIN_TEST_SECONDS, _percentile([one], ...)), inlined (nan, inf: MIN)."""
    return {
        test: one if MIN_TEST_SECONDS < one < _INF else MIN_TEST_SECONDS for test, one in seconds
    }


_seconds = operator.itemgetter(0)  # of a Sample


class Estimator:
    """What ``estimate`` makes of the runs alone (each test's own estimate, the files'
    totals and costs, the start-up, the groups), made once for the estimates of any
    number of sets of tests: the split server keeps one per suite and history version.
    Never changed once made, so threads may share one."""

    def __init__(
        self,
        runs: Sequence[Run],
        *,
        last_runs: int = DEFAULT_LAST_RUNS,
        percentile: float = DEFAULT_PERCENTILE,
    ) -> None:
        merged = merge_runs(runs)
        self.groups = _groups_of_merged(merged, last_runs)
        samples: dict[str, list[Sample]] = {}
        single = len(merged) == 1 and last_runs >= 1  # one sample per test: no lists of them
        for run in reversed(merged if not single else ()):
            for test, sample in run.tests.items():
                got = samples.setdefault(test, [])
                if len(got) < last_runs:
                    got.append(sample)
        own: dict[str, float] = {}
        if single:
            tests = merged[0].tests
            own = _own_of_one_sample(zip(tests, map(_seconds, tests.values()), strict=True))
        for test, got in samples.items():
            if len(got) == 1:
                one = got[0].seconds
                own[test] = one if MIN_TEST_SECONDS < one < _INF else MIN_TEST_SECONDS
                continue
            passed = [s.seconds for s in got if not s.failed]
            own[test] = max(
                MIN_TEST_SECONDS, _percentile(passed or [s.seconds for s in got], percentile)
            )
        self.own = own
        file_samples: dict[str, list[float]] = {}
        for run in reversed(merged):
            for f, cost in run.file_costs.items():
                got_f = file_samples.setdefault(f, [])
                if len(got_f) < last_runs:
                    got_f.append(cost)
        self.file_costs = {f: _percentile(v, percentile) for f, v in file_samples.items()}
        startups = [r.startup for r in merged[-last_runs:] if r.startup is not None]
        self.startup = _median(startups) if startups else 0.0
        # Made when first needed (each whole, or not at all: threads share them).
        self._by_file: dict[str, list[float]] | None = None
        self._by_directory: dict[str, list[float]] | None = None
        self._file_total: dict[str, float] | None = None

    @classmethod
    def of_run_seconds(
        cls,
        run: Run,
        seconds: Iterable[tuple[str, float]],
        *,
        percentile: float = DEFAULT_PERCENTILE,
    ) -> Estimator:
        """``Estimator([run])`` of a run whose tests' samples are given apart, as each
        test's seconds (run.tests empty; a test given twice takes its last seconds in
        its first place): the estimates of one run need no more of its samples."""
        if run.tests:
            raise ValueError("the run's tests are given as their seconds")
        made = cls([run], percentile=percentile)
        made.own = _own_of_one_sample(seconds)  # what __init__ makes of one run
        return made

    def _files(self) -> dict[str, list[float]]:
        """The own estimates of each file's tests. A scope is a file or a directory: its
        values are those of the tests of the file and of every file below the directory
        (a path may be both)."""
        by_file = self._by_file
        if by_file is None:
            by_file = self._by_file = _values_by_file(self.own)
        return by_file

    def _file_totals(self) -> dict[str, float]:
        """Each file's tests' own estimates added up, for runners that split by file path."""
        file_total = self._file_total
        if file_total is None:
            file_total = {}
            for (test, seconds), f in zip(self.own.items(), files_of(self.own), strict=True):
                if f != test:
                    file_total[f] = file_total.get(f, 0.0) + seconds
            self._file_total = file_total
        return file_total

    def _directories(self) -> dict[str, list[float]]:
        by_directory = self._by_directory
        if by_directory is None:
            by_directory = {}
            for path, values in self._files().items():
                for d in directories_of(path):
                    by_directory.setdefault(d, []).extend(values)
            self._by_directory = by_directory
        return by_directory

    def estimate(self, tests: Iterable[str]) -> Estimates:
        """``estimate(tests, runs)`` of the runs this was made of."""
        wanted = sorted_distinct(tests)
        file_costs = dict(self.file_costs)
        if not self.own:
            return Estimates({t: 1.0 for t in wanted}, file_costs, False, 0, self.startup)
        own = self.own
        missing = list(itertools.filterfalse(own.__contains__, wanted))  # in C
        # A file path's tests' total: only an id without "::" can be a file that way
        file_total = self._file_totals() if any("::" not in t for t in missing) else {}
        medians: dict[str, float] = {}
        guessed: dict[str, float] = {}
        for test in missing:
            if test in file_total:
                continue
            f = file_of(test)
            if f in medians:
                guessed[test] = medians[f]
                continue
            by_file, by_directory = self._files(), self._directories()
            for scope in [f, *directories_of(f)]:
                if scope in by_file or scope in by_directory:
                    if scope not in medians:
                        medians[scope] = _median(
                            by_file.get(scope, []) + by_directory.get(scope, [])
                        )
                    guessed[test] = medians[scope]
                    break  # found: every path is below the directory ""
        result = {
            t: own[t] if t in own else file_total[t] if t in file_total else guessed[t]
            for t in wanted
        }
        if file_costs:
            fallback = _median(list(file_costs.values()))
            for f in {file_of(t) for t in wanted} - file_costs.keys():
                file_costs[f] = fallback
        return Estimates(result, file_costs, True, len(result) - len(guessed), self.startup)


class SortedDistinct(list[str]):
    """Test ids that ``sorted_distinct`` gave: sorted, each once. Given to it again (the
    CLI's ids go to load_estimates, then to Estimator.estimate), they are taken as they
    are, without another pass over 100,000 ids to see it."""


def sorted_distinct(tests: Iterable[str]) -> list[str]:
    """sorted(set(tests)), without a set of 100,000 when none is needed: the tests
    themselves (as a SortedDistinct) when they are sorted and distinct, known in one
    pass in C, or none when they are a SortedDistinct; else sorted, then made distinct
    if a test comes twice (one more pass in C to see that none does)."""
    if type(tests) is SortedDistinct:
        return tests
    listed = tests if isinstance(tests, list) else list(tests)
    if all(map(operator.lt, listed, itertools.islice(listed, 1, None))):
        return SortedDistinct(listed)
    ordered = sorted(listed)
    if any(map(operator.eq, ordered, itertools.islice(ordered, 1, None))):
        return SortedDistinct(dict.fromkeys(ordered))
    return SortedDistinct(ordered)


def _values_by_file(own: Mapping[str, float]) -> dict[str, list[float]]:
    """Each file's tests' values, in own's order: cut where the file changes (found in
    C), a file's tests mostly coming one after another (own sorted)."""
    files = files_of(own)
    values = list(own.values())
    starts = [0, *itertools.compress(range(1, len(files)), map(operator.ne, files[1:], files))]
    by_file: dict[str, list[float]] = {}
    for start, end in zip(starts, [*starts[1:], len(files)], strict=True) if files else ():
        got_file = by_file.get(files[start])
        if got_file is None:
            by_file[files[start]] = values[start:end]
        else:
            got_file.extend(values[start:end])
    return by_file


# ---- the store (I/O) ----


def valid_suite(suite: str) -> bool:
    return _SUITE.fullmatch(suite) is not None


def check_suite(suite: str) -> None:
    if not _SUITE.fullmatch(suite):
        raise HistoryError(f"suite name {suite!r} must be 1-64 of letters, digits, '.', '_', '-'")


# json and uuid are imported where a record is written or read: `slipstream split
# --junit`, run by each of a matrix's runners, does neither (about 5 ms of imports).


def encode_run(run: Run) -> bytes:
    import json

    return json.dumps(
        {
            "version": RECORD_VERSION,
            "run_id": run.run_id,
            "created_ns": run.created_ns,
            "tests": {t: [s.seconds, s.failed] for t, s in sorted(run.tests.items())},
            "file_costs": dict(sorted(run.file_costs.items())),
            "startup": run.startup,
            "groups": dict(sorted(run.groups.items())),
        },
        separators=(",", ":"),
    ).encode()


def decode_run(data: bytes) -> Run:
    """A run from its record; raises ValueError for a record it cannot read."""
    import json

    try:
        raw = json.loads(data)
        if raw.get("version") != RECORD_VERSION:
            raise ValueError(f"record version {raw.get('version')!r} is not {RECORD_VERSION}")
        run_id = raw.get("run_id")
        return Run(
            run_id=str(run_id) if run_id is not None else None,
            created_ns=int(raw["created_ns"]),
            # JSON's keys are strings already
            tests={t: Sample(float(v[0]), bool(v[1])) for t, v in raw["tests"].items()},
            file_costs={str(f): float(c) for f, c in raw.get("file_costs", {}).items()},
            startup=None if raw.get("startup") is None else float(raw["startup"]),
            groups={str(t): str(g) for t, g in raw.get("groups", {}).items()},
        )
    except (KeyError, TypeError, IndexError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable timing record: {exc}") from None


def append_run(store: RecordStore, suite: str, run: Run) -> str:
    """Store one upload as a new record; returns its key."""
    return store_run(store, suite, run)[0]


def store_run(store: RecordStore, suite: str, run: Run) -> tuple[str, int]:
    """``append_run``, returning the new record's key and size (what a listing shows)."""
    import uuid

    check_suite(suite)
    key = f"{suite}/{run.created_ns:020d}-{uuid.uuid4().hex}"
    data = encode_run(run)
    if not store.put_record(NAMESPACE, key, data, overwrite=False):
        raise RuntimeError(f"timing record {key} already exists")  # a uuid4 collision
    return key, len(data)


MAX_LOADED_RECORDS = 1000  # the newest uploads load_runs reads


def load_runs(
    store: RecordStore, suite: str, *, max_records: int = MAX_LOADED_RECORDS
) -> tuple[list[Run], list[str]]:
    """The newest ``max_records`` uploads of a suite, and a warning per unreadable record."""
    check_suite(suite)
    infos = store.list_records(NAMESPACE, f"{suite}/")
    runs: list[Run] = []
    warnings: list[str] = []
    for info in infos[-max_records:]:
        data = store.get_record(NAMESPACE, info.key)
        if data is None:
            continue  # deleted since the listing
        try:
            runs.append(decode_run(data))
        except ValueError as exc:
            warnings.append(f"timing record {info.key}: {exc}; ignored")
    return runs, warnings
