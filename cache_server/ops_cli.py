"""`slipstream token`: make bearer tokens and the entries of the server's token file."""

from __future__ import annotations

import argparse
import secrets
import sys

from slipstream.cache_server.auth import SCOPES, TOKEN_NAME, hash_token
from slipstream.core.errors import UsageError

TOKEN_BYTES = 32


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "token",
        help="make bearer tokens for the cache server's token file",
        description="Make bearer tokens. The server stores only their sha256; the token itself "
        "goes to the client (e.g. Bazel: --remote_header=Authorization=Bearer TOKEN).",
    )
    sub = p.add_subparsers(dest="token_command", metavar="ACTION")
    sub.required = True
    new = sub.add_parser(
        "new",
        help="make a random token; print it and its token-file entry",
        description="Print a new random token on the first line (give it to the client, keep "
        "it secret) and, after it, the [[token]] entry to append to the token file.",
    )
    new.add_argument("--name", required=True, help="who the token is for (shown in logs)")
    new.add_argument(
        "--scopes",
        default="read",
        help=f"comma-separated scopes from {', '.join(SCOPES)} (default: read)",
    )
    new.set_defaults(handler=run_new)
    hashed = sub.add_parser(
        "hash",
        help="print the sha256 of a token read from standard input",
        description="Read a token from standard input (not the command line, which others "
        "can see) and print the sha256 hex the token file stores.",
    )
    hashed.set_defaults(handler=run_hash)


def _scopes(text: str) -> list[str]:
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise UsageError(f"--scopes {text!r}: use one or more of {', '.join(SCOPES)}")
    return scopes


def entry(name: str, digest: str, scopes: list[str]) -> str:
    """A [[token]] table for the token file."""
    listed = ", ".join(f'"{s}"' for s in scopes)
    return f'[[token]]\nname = "{name}"\nsha256 = "{digest}"\nscopes = [{listed}]\n'


def run_new(args: argparse.Namespace) -> int:
    if not TOKEN_NAME.fullmatch(args.name):
        raise UsageError(f"--name {args.name!r}: use 1-64 letters, digits and _.@:-")
    scopes = _scopes(args.scopes)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    print(token)
    print()
    print(entry(args.name, hash_token(token), scopes), end="")
    return 0


def run_hash(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        raise UsageError("no token on standard input")
    print(hash_token(token))
    return 0
