"""Where timings come from: JUnit files given on the command line, or the history store.

Shared by the CLI and the pytest plugin; this is the I/O edge around ``history.estimate``.
Opening a history store is the entry points' job (``slipstream.history_store``).
"""

from __future__ import annotations

import itertools
import operator
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from slipstream.splitter import history, junit
from slipstream.splitter.history import Run, Sample
from slipstream.splitter.ids import match_cases, none_other_in_scopes, normalize_path, slots_by_key


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
    """One run per readable report; raises FileNotFoundError for a pattern matching nothing.

    With candidates, each report is read straight onto them when it can be
    (``run_of_report``), else read whole and matched (``history.run_from_cases``): the
    same runs either way.
    """
    paths = junit.expand_paths(patterns)
    wanted = None if candidates is None else list(candidates)
    slots = None if wanted is None else slots_by_key(wanted)
    runs: list[Run] = []
    warnings: list[str] = []
    for path in paths:
        run = None
        if slots is not None:
            assert wanted is not None
            run = run_of_report(path, wanted, slots, created_ns=len(runs))
        if run is None:
            reports, warned = junit.read_reports([path])
            warnings.extend(warned)
            run = next(
                (
                    history.run_from_cases(
                        report.cases,
                        created_ns=len(runs),
                        file_costs=report.file_costs,
                        candidates=wanted,
                        startup=report.startup,
                    )
                    for report in reports
                ),
                None,
            )
        if run is not None:
            runs.append(run)
    return runs, warnings


def run_of_report(
    path: pathlib.Path,
    candidates: Sequence[str],
    slots: Mapping[str, Mapping[str, int]],
    *,
    created_ns: int,
) -> Run | None:
    """``history.run_from_cases`` of the report's cases and the candidates, read in one
    pass with no case kept (``junit.KeyedReader``; slots: ``ids.slots_by_key``), or None
    when this way cannot tell: an unreadable report (the plain read says why), or a
    candidate that no case names by (classname, name) and that could name one otherwise
    (by its node id, file or classname)."""
    reader = junit.KeyedReader(str(path), slots, len(candidates), history.MIN_SKIPPED_SECONDS)
    try:
        junit.parse(reader, junit.read_chunks(path))
    except (junit.NotJUnit, OSError):
        return None
    grouped, file_costs, startup = reader.finish()
    first = reader.first
    missed = list(itertools.compress(candidates, map(operator.is_, first, _NONES)))
    if missed and (
        reader.colon_in_names
        or not none_other_in_scopes({(c, _normalized(f)) for c, f in reader.all_scopes()}, missed)
    ):
        return None
    run = Run(None, created_ns, startup=startup)
    run.file_costs.update(file_costs)
    for candidate, matched in match_cases(grouped, candidates).items() if grouped else ():
        run.groups[candidate] = matched[0].group or ""
    # The samples of the candidates named by one case, in the candidates' order, made in C
    run.tests = dict(
        zip(
            itertools.compress(candidates, first),
            map(_new_tuple, itertools.repeat(Sample), filter(None, first)),
            strict=True,
        )
    )
    more: dict[int, list[tuple[object, Sample]]] = {}
    for slot, seconds, failed, file in reader.more:
        if slot not in more:
            one = first[slot]
            assert one is not None
            more[slot] = [(_normalized(reader.first_files[slot]), Sample(*one))]
        more[slot].append((_normalized(file), Sample(seconds, failed)))
    for slot, samples in more.items():  # a rerun, or one name in several files
        run.tests[candidates[slot]] = history.sample_of_cases(samples)
    return run


def _normalized(file: str | None) -> str | None:
    """A case's file as the plain read gives it."""
    return normalize_path(file) if file else None


_NONES = itertools.repeat(None)
_new_tuple = tuple.__new__  # a Sample without the Python frame of its __new__
