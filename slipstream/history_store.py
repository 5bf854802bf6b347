"""The local timing history: a disk store opened for the CLI and the pytest plugin."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

from slipstream.cache_server.storage.base import Store
from slipstream.cache_server.storage.disk import DiskStore, default_storage_dir
from slipstream.splitter import history
from slipstream.splitter.history import Estimates
from slipstream.splitter.sources import TimingSource, runs_from_junit


def open_store(storage_dir: pathlib.Path | None) -> Store:
    """The disk store at storage_dir (the cache's default directory when None)."""
    return DiskStore(storage_dir or default_storage_dir())


def load_estimates(source: TimingSource, tests: Iterable[str]) -> tuple[Estimates, list[str]]:
    """Estimates for tests, and warning lines (unreadable files, no history, ...).

    Raises FileNotFoundError (a JUnit pattern matching nothing) and HistoryError.
    """
    wanted = sorted(set(tests))
    if source.junit:
        runs, warnings = runs_from_junit(source.junit, wanted)
        where = "the JUnit reports"
    else:
        store = open_store(source.storage_dir)
        try:
            runs, warnings = history.load_runs(store, source.suite)
        finally:
            store.close()
        where = f"the history of suite {source.suite!r}"
    estimates = history.estimate(
        wanted, runs, last_runs=source.last_runs, percentile=source.percentile
    )
    if wanted and not estimates.from_history:
        warnings.append(f"no timings for these tests in {where}: splitting evenly by count")
    return estimates, warnings
