"""Where timings come from: JUnit files given on the command line, or the history store.

Shared by the CLI and the pytest plugin; this is the I/O edge around ``history.estimate``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cache_server.storage.base import Store
from splitter import history, junit
from splitter.history import Estimates, Run


@dataclass(frozen=True, slots=True)
class TimingSource:
    """JUnit paths/globs when given, else the history of ``suite`` in ``storage_dir``."""

    junit: Sequence[str] = ()
    storage_dir: pathlib.Path | None = None
    suite: str = "default"
    last_runs: int = history.DEFAULT_LAST_RUNS
    percentile: float = history.DEFAULT_PERCENTILE


def open_store(storage_dir: pathlib.Path | None) -> Store:
    """The disk store at storage_dir (the cache's default directory when None)."""
    from cache_server.storage.disk import DiskStore, default_storage_dir

    return DiskStore(storage_dir or default_storage_dir())


def runs_from_junit(
    patterns: Sequence[str], candidates: Iterable[str] | None
) -> tuple[list[Run], list[str]]:
    """One run per readable report; raises FileNotFoundError for a pattern matching nothing."""
    reports, warnings = junit.read_reports(junit.expand_paths(patterns))
    wanted = None if candidates is None else list(candidates)
    runs = [
        history.run_from_cases(
            report.cases,
            created_ns=n,
            file_costs=report.file_costs,
            candidates=wanted,
            startup=report.startup,
        )
        for n, report in enumerate(reports)
    ]
    return runs, warnings


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


def record_run(source: TimingSource, run: Run) -> str:
    """Append a run to the history; returns the record key."""
    store = open_store(source.storage_dir)
    try:
        return history.append_run(store, source.suite, run)
    finally:
        store.close()
