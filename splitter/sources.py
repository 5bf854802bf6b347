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
    wanted = None if candidates is None else list(candidates)
    slots = None if wanted is None else slots_by_key(wanted)
    return _runs_of(junit.expand_paths(patterns), wanted, slots)


def _runs_of(
    paths: Iterable[pathlib.Path],
    wanted: Sequence[str] | None,
    slots: Mapping[str, Mapping[str, int]] | None,
) -> tuple[list[Run], list[str]]:
    """``runs_from_junit`` of the reports at paths: each read straight onto wanted
    when slots (their ``slots_by_key``) are given and it can be, else read whole."""
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
    read = _keyed_read(path, candidates, slots, created_ns)
    if read is None:
        return None
    run, reader = read
    first = reader.first
    # The samples of the candidates named by one case, in the candidates' order, made in C
    run.tests = dict(
        zip(
            itertools.compress(candidates, first),
            map(_new_tuple, itertools.repeat(Sample), filter(None, first)),
            strict=True,
        )
    )
    for slot, sample in _samples_of_more(reader).items():  # a rerun, or one name in two files
        run.tests[candidates[slot]] = sample
    return run


def estimator_of_report(
    path: pathlib.Path,
    candidates: Sequence[str],
    slots: Mapping[str, Mapping[str, int]],
    *,
    percentile: float = history.DEFAULT_PERCENTILE,
) -> history.Estimator | None:
    """``history.Estimator([run_of_report(...)])``, without the run's samples: each
    candidate's seconds go straight to it. None where run_of_report gives None."""
    read = _keyed_read(path, candidates, slots, 0)
    if read is None:
        return None
    run, reader = read
    first = reader.first
    seconds = itertools.chain(
        zip(
            itertools.compress(candidates, first),
            map(_first, filter(None, first)),
            strict=True,
        ),
        ((candidates[slot], s.seconds) for slot, s in _samples_of_more(reader).items()),
    )
    return history.Estimator.of_run_seconds(run, seconds, percentile=percentile)


def estimator_from_junit(
    patterns: Sequence[str], candidates: Sequence[str], *, last_runs: int, percentile: float
) -> tuple[history.Estimator, list[str]]:
    """``history.Estimator(runs_from_junit(patterns, candidates))`` and its warnings: of
    one report, made straight from it when it can be (``estimator_of_report``)."""
    paths = junit.expand_paths(patterns)
    slots = slots_by_key(candidates)
    if slots is not None and len(paths) == 1 and last_runs >= 1:
        made = estimator_of_report(paths[0], candidates, slots, percentile=percentile)
        if made is not None:
            return made, []
        slots = None  # it cannot be read onto them: read whole, not tried again
    runs, warnings = _runs_of(paths, candidates, slots)
    return history.Estimator(runs, last_runs=last_runs, percentile=percentile), warnings


def _keyed_read(
    path: pathlib.Path,
    candidates: Sequence[str],
    slots: Mapping[str, Mapping[str, int]],
    created_ns: int,
) -> tuple[Run, junit.KeyedReader] | None:
    """The report read onto the candidates: its run but the tests (its file costs,
    start-up and groups), and the reader holding the tests' samples; None where
    run_of_report gives None."""
    reader = junit.KeyedReader(str(path), slots, len(candidates), history.MIN_SKIPPED_SECONDS)
    try:
        junit.parse(reader, junit.read_chunks(path))
    except (junit.NotJUnit, OSError):
        return None
    grouped, file_costs, startup = reader.finish()
    missed = list(itertools.compress(candidates, map(operator.is_, reader.first, _NONES)))
    if missed and (
        reader.colon_in_names
        or not none_other_in_scopes({(c, _normalized(f)) for c, f in reader.all_scopes()}, missed)
    ):
        return None
    run = Run(None, created_ns, startup=startup)
    run.file_costs.update(file_costs)
    for candidate, matched in match_cases(grouped, candidates).items() if grouped else ():
        run.groups[candidate] = matched[0].group or ""
    return run, reader


def _samples_of_more(reader: junit.KeyedReader) -> dict[int, Sample]:
    """The sample of each slot named by more than one case, by the plain rule."""
    more: dict[int, list[tuple[object, Sample]]] = {}
    for slot, seconds, failed, file in reader.more:
        if slot not in more:
            one = reader.first[slot]
            assert one is not None
            more[slot] = [(_normalized(reader.first_files[slot]), Sample(*one))]
        more[slot].append((_normalized(file), Sample(seconds, failed)))
    return {slot: history.sample_of_cases(samples) for slot, samples in more.items()}


def _normalized(file: str | None) -> str | None:
    """A case's file as the plain read gives it."""
    return normalize_path(file) if file else None


_NONES = itertools.repeat(None)
_first = operator.itemgetter(0)
_new_tuple = tuple.__new__  # a Sample without the Python frame of its __new__
