"""The `slipstream` command: one entry point, one subcommand per job.

Each component registers its own subcommands (cache_server.cli, splitter.cli,
client.layers_cli, ...). A handler returns the process exit code. Bad input is
reported as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

# Modules that define `register(subparsers)`; each adds its subcommands and
# sets `handler` (a function of the parsed args returning an exit code).
SUBCOMMAND_MODULES = (
    "cache_server.cli",
    "splitter.cli",
    "client.layers_cli",
    "client.shard_cli",
    "cache_server.ops_cli",
)

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage plus the message; keep to one line on stderr.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slipstream", description="Fast CI: build cache and test splitter.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that component is not there yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core logs its own copy of errors to stderr; the command reports
    # them itself, in one line. GRPC_VERBOSITY set by the user still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        print(f"slipstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the imported module, not __main__, so exception classes that the
    # subcommand modules import from client.cli are the ones caught here.
    from client.cli import main as _main

    raise SystemExit(_main())
