"""The timing history as the pages read it: decoded uploads kept between page views.

A page view lists a suite's records (one listing) and reads and decodes only the
uploads it has not kept: a view of an unchanged history reads no record, and a new
upload costs one read. An upload is written once under a new key (history.append_run),
so its key and size name it; the modification time is not used, since the disk
store moves it as the entry is used. Memory is bounded by the test results kept over
all suites (about 110 bytes each, test ids shared between uploads): each suite keeps
its newest uploads within an equal share of the budget.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Sequence

from slipstream.cache_server.storage.base import RecordInfo, Store
from slipstream.splitter import history
from slipstream.splitter.history import Run

MAX_KEPT_RESULTS = 400_000  # test results (one test in one upload), over all suites

Ident = tuple[str, int]  # a record's key and size


class HistoryCache:
    """history.load_runs for the pages, with the decoded uploads kept (see the module doc)."""

    def __init__(self, store: Store, max_results: int = MAX_KEPT_RESULTS) -> None:
        self.store = store
        self.max_results = max_results
        self._lock = threading.Lock()
        self._suites: dict[str, dict[Ident, Run]] = {}  # each newest first
        self._results: dict[str, int] = {}
        self.records_read = 0  # records read and decoded, for the tests

    def kept_results(self) -> int:
        with self._lock:
            return sum(self._results.values())

    def load_runs(
        self, suite: str, *, max_records: int = history.MAX_LOADED_RECORDS
    ) -> tuple[list[Run], list[str]]:
        """As history.load_runs; HistoryError for a name no suite can have."""
        runs, warnings = self.load(suite, max_records=max_records)
        return [run for _, run in runs], warnings

    def load(
        self,
        suite: str,
        *,
        max_records: int = history.MAX_LOADED_RECORDS,
        infos: Sequence[RecordInfo] | None = None,
    ) -> tuple[list[tuple[Ident, Run]], list[str]]:
        """``load_runs`` with each run's record (its key and size): which records a
        history holds is its version. infos: the suite's records as the caller just
        listed them (saves a listing: on S3, a LIST call)."""
        history.check_suite(suite)
        if infos is None:
            infos = self.store.list_records(history.NAMESPACE, f"{suite}/")
        infos = infos[-max_records:]
        with self._lock:
            held = self._suites.get(suite, {})
        runs: list[tuple[Ident, Run]] = []
        warnings: list[str] = []
        for info in infos:
            ident = (info.key, info.size)
            run = held.get(ident)
            if run is None:
                data = self.store.get_record(history.NAMESPACE, info.key)
                if data is None:
                    continue  # deleted since the listing
                self.records_read += 1
                try:
                    run = history.decode_run(data)
                except ValueError as exc:
                    warnings.append(f"timing record {info.key}: {exc}; ignored")
                    continue
                # One copy of each test id for all uploads: 40% of a kept result's memory.
                run.tests = {sys.intern(test): sample for test, sample in run.tests.items()}
            runs.append((ident, run))
        self._keep(suite, runs)
        return runs, warnings

    def add(self, suite: str, record: Ident, run: Run) -> None:
        """Keep a run just stored under record (by this process: no need to read it back),
        as the newest of its suite's."""
        run.tests = {sys.intern(test): sample for test, sample in run.tests.items()}
        with self._lock:
            held = list(self._suites.get(suite, {}).items())  # newest first
        self._keep(suite, [*reversed(held), (record, run)])

    def _keep(self, suite: str, runs: list[tuple[Ident, Run]]) -> None:
        """Keep the newest of a suite's runs within an equal share of the budget, and trim
        the other suites to that share (their oldest go). Equal shares rather than least
        recently used: the overview reads every suite in turn, and suites that pushed each
        other out would all be read in full on every view."""
        with self._lock:
            self._suites.pop(suite, None)
            self._results.pop(suite, None)
            share = self.max_results // (len(self._suites) + (1 if runs else 0) or 1)
            for other, held in list(self._suites.items()):
                if self._results[other] > share:
                    self._suites[other], self._results[other] = _newest(held.items(), share)
            if runs:
                self._suites[suite], self._results[suite] = _newest(reversed(runs), share)


def _newest(runs: Iterable[tuple[Ident, Run]], limit: int) -> tuple[dict[Ident, Run], int]:
    """The runs, newest first, as long as their results stay within limit; and how many."""
    kept: dict[Ident, Run] = {}
    results = 0
    for ident, run in runs:
        if results + len(run.tests) > limit:
            break
        kept[ident] = run
        results += len(run.tests)
    return kept, results
