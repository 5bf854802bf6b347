"""The `slipstream` command: one entry point, one subcommand per job.

Each component registers its own subcommands (slipstream.cache_server.cli,
slipstream.split_cli, slipstream.client.layers_cli, ...). A handler returns the
process exit code. Bad input is reported as one line on stderr with exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from slipstream.core.errors import UsageError
from slipstream.core.helptext import ParagraphFormatter

# Modules that define `register(subparsers)`; each adds its subcommands and
# sets `handler` (a function of the parsed args returning an exit code).
SUBCOMMAND_MODULES = (
    "slipstream.split_cli",
    "slipstream.report_cli",
    "slipstream.client.layers_cli",
    "slipstream.client.shard_cli",
)
# The server's subcommands, by module: without the `server` extra installed they
# are still listed, and say what to install.
SERVER_SUBCOMMANDS = {
    "slipstream.cache_server.cli": ("serve", "run the cache server"),
    "slipstream.cache_server.ops_cli": ("token", "make access tokens for the server"),
}
SERVER_EXTRA = "pip install 'slipstream[server]'"
# Commands whose module is imported alone when the command line names them: each of a
# matrix's runners calls `slipstream split` once, and the server's modules (gRPC,
# protobuf) would cost it more than its split does.
LIGHT_COMMANDS = {"split": "slipstream.split_cli", "plan": "slipstream.split_cli"}

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", ParagraphFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage plus the message; keep to one line on stderr.
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        # The innermost subcommand's parser finishes first: its name is the command's
        # ("slipstream cache save"), which every error line starts with.
        if not hasattr(parsed, "command_name"):
            parsed.command_name = self.prog
        return parsed, rest


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command`` one of LIGHT_COMMANDS, only its module's."""
    parser = _Parser(prog="slipstream", description="Fast CI: build cache and test splitter.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    if command in LIGHT_COMMANDS:
        importlib.import_module(LIGHT_COMMANDS[command]).register(subparsers)
        return parser
    for name, (command, summary) in SERVER_SUBCOMMANDS.items():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.startswith("slipstream"):
                raise
            _register_missing(subparsers, command, summary, exc.name)
            continue
        module.register(subparsers)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _register_missing(
    subparsers: argparse._SubParsersAction[_Parser],
    command: str,
    summary: str,
    missing: str,
) -> None:
    def handler(args: argparse.Namespace) -> int:
        raise UsageError(f"needs the server's packages (no module {missing!r}): {SERVER_EXTRA}")

    p = subparsers.add_parser(command, help=f"{summary} (needs {SERVER_EXTRA})")
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(handler=handler)


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core logs its own copy of errors to stderr; the command reports
    # them itself, in one line. GRPC_VERBOSITY set by the user still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words[0] if words else None)
    args = parser.parse_args(words)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        print(f"{args.command_name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
