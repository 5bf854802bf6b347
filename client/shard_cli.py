"""``slipstream shard`` (this runner's shard from the split service) and
``slipstream timings upload`` (JUnit reports into the server's history)."""

from __future__ import annotations

import argparse
import os
import sys

from slipstream.client.split_client import (
    DEFAULT_CONNECT_TIMEOUT,
    RunSpec,
    SplitClient,
    SplitRefused,
    SplitUnavailable,
    shard_or_fallback,
)
from slipstream.core.addresses import DEFAULT_LISTEN, server_address
from slipstream.core.errors import UsageError
from slipstream.core.helptext import ParagraphFormatter
from slipstream.splitter import ci, history, junit
from slipstream.splitter.algorithm import GRANULARITIES
from slipstream.splitter.history import Estimates, HistoryError
from slipstream.splitter.sources import runs_from_junit

SHARD_EPILOG = f"""\
exit status:
  0   the shard was printed (from the server, or the local fallback when the
      server cannot be reached: one warning line on stderr, then the local
      split)
  1   the server refused: e.g. this runner collected other tests than the
      run's plan
  2   bad usage
The server is --server, else $SLIPSTREAM_SERVER, else {DEFAULT_LISTEN}.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = subparsers.add_parser(
        "shard",
        help="print this runner's tests, as the split server pins them for the run",
        description="Read test ids (one per line) on stdin and print those of shard INDEX of "
        "the plan the server pins for (suite, --run-key, TOTAL): every runner of the run, and "
        "a retried job, gets the same split. When the server cannot be reached within "
        "--connect-timeout, split locally (by --junit timings if given, else by a hash of "
        "the test ids). The summary and the plan hash go to stderr.",
        epilog=SHARD_EPILOG,
        formatter_class=ParagraphFormatter,
    )
    sp.add_argument("--run-key", required=True, help="the CI run's id, the same on every runner")
    sp.add_argument("--total", type=int, help="number of shards (default: from CI variables)")
    sp.add_argument("--index", type=int, help="this shard, 0-based (default: from CI variables)")
    sp.add_argument("--suite", default="default", help="history suite name (default: default)")
    sp.add_argument("--by", choices=GRANULARITIES, default="auto", help="unit of splitting")
    sp.add_argument(
        "--junit",
        action="append",
        default=[],
        metavar="PATH",
        help="JUnit reports for the local split when the server is unreachable: "
        + junit.PATHS_HELP,
    )
    _server_options(sp)
    sp.set_defaults(handler=run_shard)

    timings = subparsers.add_parser(
        "timings", help="the split server's timing history", description="Timing history."
    )
    actions = timings.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    up = actions.add_parser(
        "upload",
        help="send JUnit reports to the server's history",
        description="Stream JUnit reports to the split server, which appends them to the "
        "suite's timing history (reports with the same --run-id merge into one run).",
    )
    up.add_argument("reports", nargs="+", metavar="REPORT", help=f"JUnit XML: {junit.PATHS_HELP}")
    up.add_argument("--suite", default="default", help="history suite name (default: default)")
    up.add_argument("--run-id", help="id shared by the shards of one run (default: CI's)")
    _server_options(up)
    up.set_defaults(handler=run_upload)


def _server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="HOST:PORT", help=f"split server (default {DEFAULT_LISTEN})")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on the server after this long (default {DEFAULT_CONNECT_TIMEOUT:.0f})",
    )


def _client(args: argparse.Namespace) -> SplitClient:
    if args.connect_timeout <= 0:
        raise UsageError("--connect-timeout must be positive")
    try:
        return SplitClient(server_address(args.server), connect_timeout=args.connect_timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _shard_args(args: argparse.Namespace) -> tuple[int, int]:
    try:
        return ci.resolve_shard(args.index, args.total, os.environ)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run_shard(args: argparse.Namespace) -> int:
    index, total = _shard_args(args)
    client = _client(args)
    tests = list(dict.fromkeys(line.strip() for line in sys.stdin if line.strip()))

    def local_estimates() -> Estimates | None:
        if not args.junit:
            return None
        try:
            runs, _ = runs_from_junit(args.junit, tests)
        except (FileNotFoundError, ValueError) as exc:
            print(f"slipstream shard: warning: {exc}", file=sys.stderr)
            return None
        return history.estimate(tests, runs)

    try:
        answer = shard_or_fallback(
            client,
            RunSpec(args.suite, args.run_key, index, total, tests, args.by),
            local_estimates=local_estimates,
        )
    except SplitRefused as exc:
        print(f"slipstream shard: error: {exc}", file=sys.stderr)
        return 1
    mine = set(answer.tests)
    sys.stdout.writelines(t + "\n" for t in tests if t in mine)
    if answer.fallback is not None:
        print(f"slipstream shard: warning: {answer.fallback}", file=sys.stderr)
        where = "local fallback"
    else:
        where = f"server; predicted {answer.predicted or 0.0:.1f}s, makespan "
        where += f"{answer.makespan or 0.0:.1f}s"
    print(
        f"slipstream shard: shard {index} of 0..{total - 1}: {len(mine)} of {len(tests)} "
        f"tests ({where}); plan {answer.plan_hash}",
        file=sys.stderr,
    )
    return 0


def run_upload(args: argparse.Namespace) -> int:
    try:
        history.check_suite(args.suite)
        paths = junit.expand_paths(args.reports)
    except (FileNotFoundError, HistoryError) as exc:
        raise UsageError(str(exc)) from None
    try:
        for path in paths:
            junit.check_report(path)  # the server would only say "report N"
        reports = [p.read_bytes() for p in paths]
    except junit.NotJUnit as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"{exc.filename}: {exc.strerror or exc}") from None
    run_id = args.run_id or ci.run_id_from_env(os.environ)
    try:
        with _client(args) as client:
            count, tests = client.upload_timings(args.suite, run_id, reports)
    except (SplitUnavailable, SplitRefused) as exc:
        print(f"slipstream timings upload: error: {exc}", file=sys.stderr)
        return 1
    print(f"uploaded {count} reports, {tests} test timings, to suite {args.suite!r}")
    return 0
