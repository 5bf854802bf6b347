"""`slipstream serve`: run the cache server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib

from cache_server.server import DEFAULT_LISTEN, ServerConfig, serve
from cache_server.sizes import parse_size
from client.cli import UsageError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the build cache server (REAPI v2 over gRPC)",
        description="Run the build cache server: REAPI v2 CAS, ActionCache, ByteStream, Capabilities.",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    p.add_argument(
        "--storage",
        type=pathlib.Path,
        metavar="DIR",
        help="directory of the local disk store (default: ~/.cache/slipstream, or $XDG_CACHE_HOME)",
    )
    p.add_argument("--max-size", metavar="SIZE", help="size bound with LRU eviction, e.g. 10G")
    p.add_argument(
        "--read-only-ac",
        action="store_true",
        help="refuse UpdateActionResult (clients may still upload CAS blobs)",
    )
    p.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        max_size = parse_size(args.max_size) if args.max_size else None
    except ValueError as exc:
        raise UsageError(f"--max-size: {exc}") from None
    if args.listen.rpartition(":")[0] == "" or not args.listen.rpartition(":")[2].isdigit():
        raise UsageError(f"--listen {args.listen!r} is not HOST:PORT")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        listen=args.listen,
        storage=args.storage,
        max_size=max_size,
        update_enabled=not args.read_only_ac,
    )
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        raise UsageError(str(exc)) from None
    return 0
