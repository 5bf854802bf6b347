"""``slipstream report --html FILE``: the overview and run pages as one HTML file.

From the timing history (every suite in it, or the --suite ones) or from JUnit
reports (the shards of one run); no server needed, nothing fetched when opened.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from slipstream.core.errors import UsageError
from slipstream.history_store import load_history, suites_in
from slipstream.split_cli import parse_duration
from slipstream.splitter import dashboard, junit
from slipstream.splitter.history import HistoryError, Run
from slipstream.splitter.sources import runs_from_junit

JUNIT_SUITE = "junit"
JUNIT_RUN_ID = "junit"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``report`` subcommand."""
    rp = subparsers.add_parser(
        "report",
        help="write the timing history as one HTML page",
        description="Write the overview (each suite's test-stage wall per run against the "
        "target, the shards `slipstream plan` says meet it), each recent run's shards and "
        "slowest tests, and each suite's slow, variable and flaky tests as one "
        "self-contained HTML file (no scripts, nothing fetched), e.g. a CI artifact. "
        "From the history in --storage-dir, or from --junit reports taken as the shards "
        "of one run.",
    )
    rp.add_argument("--html", required=True, metavar="FILE", help="where to write the page")
    rp.add_argument(
        "--junit",
        action="append",
        default=[],
        metavar="PATH",
        help=f"JUnit XML report(s), the shards of one run: {junit.PATHS_HELP}",
    )
    rp.add_argument(
        "--storage-dir", type=pathlib.Path, help="history location (default: the cache's)"
    )
    rp.add_argument(
        "--suite",
        action="append",
        default=[],
        help="history suite to show, repeatable (default: every suite in the history)",
    )
    rp.add_argument("--build-target", default="10m", help="build stage target (default 10m)")
    rp.add_argument("--test-target", default="20m", help="test stage target (default 20m)")
    rp.add_argument("--total-target", default="45m", help="whole pipeline target (default 45m)")
    rp.set_defaults(handler=run_report)


def _suites(args: argparse.Namespace) -> dict[str, list[Run]]:
    try:
        if args.junit:
            uploads, warnings = runs_from_junit(args.junit, None)
            for upload in uploads:
                upload.run_id = JUNIT_RUN_ID
            suites = {JUNIT_SUITE: uploads}
        else:
            warnings = []
            suites = {}
            for suite in args.suite or suites_in(args.storage_dir):
                runs, more = load_history(args.storage_dir, suite)
                suites[suite] = runs
                warnings += more
    except (FileNotFoundError, HistoryError) as exc:
        raise UsageError(str(exc)) from None
    for line in warnings:
        print(f"slipstream report: warning: {line}", file=sys.stderr)
    return suites


def run_report(args: argparse.Namespace) -> int:
    targets = dashboard.Targets(
        build=parse_duration(args.build_target),
        test=parse_duration(args.test_target),
        total=parse_duration(args.total_target),
    )
    if min(targets.build, targets.test, targets.total) <= 0:
        raise UsageError("targets must be longer than 0s")
    text = dashboard.report(_suites(args), targets)
    try:
        tmp = f"{args.html}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.html)
    except OSError as exc:
        raise UsageError(f"--html {args.html}: {exc.strerror or exc}") from None
    print(f"slipstream report: wrote {args.html}", file=sys.stderr)
    return 0
