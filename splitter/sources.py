"""Where timings come from: JUnit files given on the command line, or the history store.

Shared by the CLI and the pytest plugin; this is the I/O edge around ``history.estimate``.
Opening a history store is the entry points' job (``slipstream.history_store``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from slipstream.splitter import history, junit
from slipstream.splitter.history import Run


@dataclass(frozen=True, slots=True)
class TimingSource:
    """JUnit paths/globs when given, else the history of ``suite`` in ``storage_dir``."""

    junit: Sequence[str] = ()
    storage_dir: pathlib.Path | None = None
    suite: str = "default"
    last_runs: int = history.DEFAULT_LAST_RUNS
    percentile: float = history.DEFAULT_PERCENTILE


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
