"""The timing history as the pages read it: decoded uploads kept between page views.

A page view lists a suite's records (one listing) and reads and decodes only the
uploads it has not kept: a view of an unchanged history reads no record, and a new
upload costs one read. An upload is written once under a new key (history.append_run),
so its key and size name it; the modification time is not used, since the disk
store moves it as the entry is used. Memory is bounded by the test results kept over
all suites (about 200 bytes each): the suites viewed least recently go first, and a
suite bigger than the whole budget keeps its newest uploads only.
"""

from __future__ import annotations

import collections
import threading

from slipstream.cache_server.storage.base import Store
from slipstream.splitter import history
from slipstream.splitter.history import Run

MAX_KEPT_RESULTS = 250_000  # test results (one test in one upload), over all suites

_Ident = tuple[str, int]  # a record's key and size


class HistoryCache:
    """history.load_runs for the pages, with the decoded uploads kept (see the module doc)."""

    def __init__(self, store: Store, max_results: int = MAX_KEPT_RESULTS) -> None:
        self.store = store
        self.max_results = max_results
        self._lock = threading.Lock()
        self._suites: collections.OrderedDict[str, dict[_Ident, Run]] = collections.OrderedDict()
        self._results: dict[str, int] = {}
        self.records_read = 0  # records read and decoded, for the tests

    def kept_results(self) -> int:
        with self._lock:
            return sum(self._results.values())

    def load_runs(
        self, suite: str, *, max_records: int = history.MAX_LOADED_RECORDS
    ) -> tuple[list[Run], list[str]]:
        """As history.load_runs; HistoryError for a name no suite can have."""
        history.check_suite(suite)
        infos = self.store.list_records(history.NAMESPACE, f"{suite}/")[-max_records:]
        with self._lock:
            held = self._suites.get(suite, {})
        runs: list[tuple[_Ident, Run]] = []
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
            runs.append((ident, run))
        self._keep(suite, runs)
        return [run for _, run in runs], warnings

    def _keep(self, suite: str, runs: list[tuple[_Ident, Run]]) -> None:
        """Keep the newest of runs that fit the budget, then drop other suites' to fit."""
        kept: dict[_Ident, Run] = {}
        results = 0
        for ident, run in reversed(runs):
            if results + len(run.tests) > self.max_results:
                break
            kept[ident] = run
            results += len(run.tests)
        with self._lock:
            self._suites.pop(suite, None)
            self._results.pop(suite, None)
            total = sum(self._results.values()) + results
            while total > self.max_results and self._suites:
                oldest, _ = self._suites.popitem(last=False)
                total -= self._results.pop(oldest)
            if kept:
                self._suites[suite] = kept
                self._results[suite] = results
