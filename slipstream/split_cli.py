"""``slipstream split`` and ``slipstream plan``."""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import pathlib
import re
import sys
from collections.abc import Iterator, Sequence

from slipstream.core.errors import UsageError
from slipstream.history_store import load_estimates, load_history
from slipstream.splitter import ci, history, junit
from slipstream.splitter.algorithm import GRANULARITIES, Plan, fewest_shards, split_tests
from slipstream.splitter.history import Estimates, HistoryError
from slipstream.splitter.sources import TimingSource, runs_from_junit

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([hms]?)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_duration(text: str) -> float:
    """Seconds from ``20m``, ``1h30m``, ``90s``, ``1.5m`` or a plain number of seconds."""
    compact = text.strip().lower().replace(" ", "")
    pos, total = 0, 0.0
    while pos < len(compact):
        m = _DURATION.match(compact, pos)
        if not m:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not compact or pos != len(compact):
        raise UsageError(f"{text!r} is not a duration (like 20m, 1h30m, 90s)")
    return total


def _as_written(duration: str) -> str:
    """A duration as the user wrote it (``20m``, ``1h30m``), a bare number with its unit."""
    compact = duration.strip().replace(" ", "")
    return f"{compact}s" if compact[-1:].isdigit() or compact.endswith(".") else compact


def _add_timing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--junit",
        action="append",
        default=[],
        metavar="PATH",
        help=f"JUnit XML report(s) to learn timings from, repeatable: {junit.PATHS_HELP} "
        "(default: the timing history in the storage dir)",
    )
    p.add_argument(
        "--storage-dir", type=pathlib.Path, help="history location (default: the cache's)"
    )
    p.add_argument("--suite", default="default", help="history suite name (default: default)")
    p.add_argument(
        "--by",
        choices=GRANULARITIES,
        default="auto",
        help="unit of splitting; auto keeps files whole unless they are too long (default)",
    )
    p.add_argument(
        "--startup",
        type=float,
        metavar="SECONDS",
        help="per-shard start-up cost (default: learnt from the timings, else 0)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``split`` and ``plan`` subcommands."""
    sp = subparsers.add_parser(
        "split",
        help="print the tests of one shard",
        description="Read test ids (one per line) on stdin and print those of shard INDEX "
        "(0-based). Without --index/--total, CircleCI, GitLab CI and Buildkite variables are "
        "used (GitLab's 1-based CI_NODE_INDEX is converted). The plan summary and its hash "
        "go to stderr.",
    )
    sp.add_argument("--total", type=int, help="number of shards")
    sp.add_argument("--index", type=int, help="this shard, 0-based: 0 to TOTAL-1")
    _add_timing_options(sp)
    sp.add_argument("--quiet", action="store_true", help="no plan summary on stderr")
    sp.set_defaults(handler=run_split)

    pp = subparsers.add_parser(
        "plan",
        help="the fewest shards that meet a target time",
        description="From the timing history (or --junit reports), the fewest shards whose "
        "predicted slowest shard, plus the overhead, meets the target.",
    )
    pp.add_argument("--target", required=True, help="wall-time target per shard, e.g. 20m")
    pp.add_argument("--overhead", default="0s", help="per-shard fixed cost, e.g. 1m (default 0s)")
    pp.add_argument("--max-shards", type=int, default=256, help="search limit (default 256)")
    _add_timing_options(pp)
    pp.set_defaults(handler=run_plan)


def _source(args: argparse.Namespace) -> TimingSource:
    return TimingSource(junit=tuple(args.junit), storage_dir=args.storage_dir, suite=args.suite)


def _estimates(args: argparse.Namespace, tests: Sequence[str]) -> Estimates:
    try:
        estimates, warnings = load_estimates(_source(args), tests)
    except (FileNotFoundError, HistoryError) as exc:
        raise UsageError(str(exc)) from None
    for line in warnings:
        print(f"slipstream {args.command}: warning: {line}", file=sys.stderr)
    return estimates


def _shard_args(args: argparse.Namespace) -> tuple[int, int]:
    try:
        return ci.resolve_shard(args.index, args.total, os.environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def summary(plan: Plan, index: int) -> str:
    """One line every runner prints: its share, the plan's quality and its hash."""
    shard = plan.shards[index]
    return (
        f"shard {index} of 0..{len(plan.shards) - 1}: {len(shard.tests)} tests in "
        f"{len(shard.files)} files, predicted {shard.predicted:.1f}s; makespan "
        f"{plan.makespan:.1f}s, lower bound {plan.lower_bound:.1f}s, ratio {plan.ratio:.3f}; "
        f"plan {plan.plan_hash}"
    )


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector off: a split makes a few objects per test and no
    cycles, and the collector would walk them all again and again as they pile up
    (about a sixth of the time at 100,000 tests) to find nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_split(args: argparse.Namespace) -> int:
    with _without_cyclic_gc():
        return _split(args)


def _split(args: argparse.Namespace) -> int:
    index, total = _shard_args(args)
    if args.startup is not None and args.startup < 0:
        raise UsageError("--startup must not be negative")
    tests = list(filter(None, map(str.strip, sys.stdin.read().split("\n"))))
    wanted = history.sorted_distinct(tests)  # what load_estimates makes of them, once
    if len(wanted) != len(tests):  # an id twice: printed once, where it first came
        tests = list(dict.fromkeys(tests))
    estimates = _estimates(args, wanted)
    del wanted  # 100,000 ids held once is enough during the split
    plan = split_tests(
        estimates.tests,
        total,
        args.by,
        file_costs=estimates.file_costs,
        startup=estimates.startup if args.startup is None else args.startup,
    )
    mine = set(plan.shards[index].tests)
    # This shard's tests in the order they came, picked out in C.
    sys.stdout.write("".join(t + "\n" for t in filter(mine.__contains__, tests)))
    if not args.quiet:
        print(f"slipstream split: {summary(plan, index)}", file=sys.stderr)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    with _without_cyclic_gc():
        return _plan(args)


def _plan(args: argparse.Namespace) -> int:
    target = parse_duration(args.target)
    overhead = parse_duration(args.overhead)
    if target <= overhead:
        raise UsageError("--target must be longer than --overhead")
    if args.max_shards < 1:
        raise UsageError("--max-shards must be at least 1")
    tests = _history_tests(args)
    if not tests:
        raise UsageError(
            "no timings to plan from: run with the pytest plugin's --shard-record, or give --junit"
        )
    estimates = _estimates(args, tests)
    per_shard = target - overhead
    startup = estimates.startup if args.startup is None else args.startup

    def predict(n: int) -> Plan:
        return split_tests(
            estimates.tests,
            n,
            args.by,
            file_costs=estimates.file_costs,
            startup=startup,
            max_iterations=200,
        )

    total = math.fsum(estimates.tests.values()) + math.fsum(estimates.file_costs.values())
    search = fewest_shards(
        estimates.tests,
        per_shard,
        args.by,
        file_costs=estimates.file_costs,
        startup=startup,
        max_shards=args.max_shards,
    )
    plans, chosen, too_long, last = search.plans, search.chosen, search.too_long, search.last
    shown = range(max(1, last - 2), min(args.max_shards, last + 2) + 1)
    print(
        f"{len(tests)} tests, {total:.1f}s in all; "
        f"target {_as_written(args.target)} with {_as_written(args.overhead)} overhead"
    )
    print(f"{'shards':>6}  {'predicted':>10}  {'lower bound':>11}  {'ratio':>6}")
    for k in shown:
        plan = plans.get(k) or predict(k)
        mark = "  <- fewest that meet the target" if k == chosen else ""
        print(
            f"{k:>6}  {plan.makespan + overhead:>9.1f}s  {plan.lower_bound + overhead:>10.1f}s  "
            f"{plan.ratio:>6.3f}{mark}"
        )
    if too_long:
        print("no number of shards meets the target: a unit that cannot be split is longer")
        return 1
    if chosen is None:
        print(f"no number of shards up to {args.max_shards} meets the target")
        return 1
    return 0


def _history_tests(args: argparse.Namespace) -> list[str]:
    """The tests the history (or the given reports) knows of: those of its recent runs."""

    try:
        if args.junit:
            runs, _ = runs_from_junit(args.junit, None)
        else:
            runs, _ = load_history(args.storage_dir, args.suite)
    except (FileNotFoundError, HistoryError) as exc:
        raise UsageError(str(exc)) from None
    recent = history.merge_runs(runs)[-history.DEFAULT_LAST_RUNS :]
    return sorted({t for run in recent for t in run.tests})
