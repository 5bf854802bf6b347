"""`slipstream cache save` and `slipstream cache restore`: cached layers for CI runners."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import grpc
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from slipstream.client.cas_client import CasError, connect_ready
from slipstream.client.layer_tree import (
    DEFAULT_LIMITS,
    MAX_DEPTH_LIMIT,
    IncompleteTree,
    TreeLimits,
    UnsafeTree,
)
from slipstream.client.layers import (
    LayerClient,
    LayerError,
    LayerExists,
    NoProgress,
    RestoreResult,
    SaveResult,
)
from slipstream.core.addresses import DEFAULT_LISTEN, server_address
from slipstream.core.errors import UsageError
from slipstream.core.helptext import ParagraphFormatter
from slipstream.core.records import MAX_RECORD_KEY_CHARS
from slipstream.core.sizes import parse_size

CONNECT_TIMEOUT = 10.0
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PARTIAL = 10
EXIT_MISS = 11

RESTORE_EPILOG = f"""\
exit status:
  0   restored (exact key, restore-key hit or miss: a miss never fails a CI
      step)
  1   error: server unreachable, unsafe or incomplete tree, disk error
  2   bad usage
with --exit-code the hit kind shows in the status too (like `git diff --exit-code`):
  0   exact hit: the layer for --key was restored
  {EXIT_PARTIAL}  partial hit: the newest layer matching a --restore-key was restored
  {EXIT_MISS}  miss: nothing was restored
The summary line on stdout starts with `cache-hit: exact|partial|miss`.
The server is --server, else $SLIPSTREAM_SERVER, else {DEFAULT_LISTEN}.
"""

SAVE_EPILOG = f"""\
exit status:
  0   saved, or the key already exists and --overwrite was not given (nothing
      changed: re-saving after an exact hit is not an error, as with
      actions/cache)
  1   error: server unreachable, file unreadable, upload failed
  2   bad usage
Paths are stored relative to the working directory and restored at the same
place under --into. Files keep their permission bits (rwx for user, group and
other; setuid, setgid and sticky are dropped); directories are restored 0755
(less the umask). The server is --server, else $SLIPSTREAM_SERVER, else {DEFAULT_LISTEN}.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = subparsers.add_parser(
        "cache",
        help="save and restore directories by key through the CAS (for CI runners)",
        description="Save and restore directories by key through the CAS.",
    )
    actions = cache.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    save = actions.add_parser(
        "save",
        help="store PATHs in the cache under KEY",
        description="Store PATHs under KEY; only files the server lacks are uploaded.",
        epilog=SAVE_EPILOG,
        formatter_class=ParagraphFormatter,
    )
    _common(save)
    save.add_argument(
        "--overwrite", action="store_true", help="replace an existing layer under KEY"
    )
    save.add_argument("paths", nargs="+", metavar="PATH", type=Path, help="files or directories")
    save.set_defaults(handler=run_save)

    restore = actions.add_parser(
        "restore",
        help="restore the layer for KEY (or the newest matching a --restore-key)",
        description="Restore the layer saved under KEY, else the newest whose key starts with "
        "each --restore-key in turn.",
        epilog=RESTORE_EPILOG,
        formatter_class=ParagraphFormatter,
    )
    _common(restore)
    restore.add_argument(
        "--restore-key",
        action="append",
        default=[],
        metavar="PREFIX",
        help="fallback key prefix, tried in order (repeatable)",
    )
    restore.add_argument(
        "--into", type=Path, default=Path("."), metavar="DIR", help="target directory (default .)"
    )
    restore.add_argument(
        "--exit-code", action="store_true", help="tell the hit kind in the exit status"
    )
    restore.add_argument(
        "--strict-symlinks",
        action="store_true",
        help="refuse symlinks that are absolute or point outside the tree",
    )
    limits = restore.add_argument_group(
        "limits (a tree over one is refused before anything is written)"
    )
    limits.add_argument(
        "--max-entries",
        type=int,
        default=DEFAULT_LIMITS.entries,
        metavar="N",
        help="files, symlinks and directories, repeated subtrees counted each time "
        f"(default {DEFAULT_LIMITS.entries:,})",
    )
    limits.add_argument(
        "--max-depth",
        type=int,
        default=DEFAULT_LIMITS.depth,
        metavar="N",
        help=f"directory levels (default {DEFAULT_LIMITS.depth}, at most {MAX_DEPTH_LIMIT})",
    )
    limits.add_argument(
        "--max-bytes",
        default=f"{DEFAULT_LIMITS.file_bytes >> 30}G",
        metavar="SIZE",
        help=f"file content written, e.g. 20G (default {DEFAULT_LIMITS.file_bytes >> 30}G)",
    )
    limits.add_argument(
        "--max-tree-bytes",
        default=f"{DEFAULT_LIMITS.tree_bytes >> 20}M",
        metavar="SIZE",
        help="Directory messages downloaded to describe the tree "
        f"(default {DEFAULT_LIMITS.tree_bytes >> 20}M)",
    )
    restore.set_defaults(handler=run_restore)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--key", required=True, help=f"layer key (1 to {MAX_RECORD_KEY_CHARS} characters)"
    )
    p.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="cache server: HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS)",
    )
    p.add_argument("--workers", type=int, default=8, help="parallel transfers (default 8)")


def _check_key(key: str, what: str) -> None:
    if not key or len(key) > MAX_RECORD_KEY_CHARS:
        raise UsageError(f"{what} must be 1 to {MAX_RECORD_KEY_CHARS} characters")
    if any(ord(c) < 32 for c in key):
        raise UsageError(f"{what} {key[:40]!r} contains control characters")


def _connect(args: argparse.Namespace) -> grpc.Channel:
    try:
        address = server_address(args.server)
    except ValueError as exc:
        raise UsageError(f"--server: {exc}") from None
    if args.workers < 1 or args.workers > 64:
        raise UsageError("--workers must be 1 to 64")
    return connect_ready(address, CONNECT_TIMEOUT)


class RichProgress:
    """A rich progress bar on a terminal: bytes, rate, and bytes skipped as present."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[skipped]}"),
            transient=True,
        )
        self._task = self._progress.add_task("starting", total=None, skipped="")
        self._lock = threading.Lock()
        self._skipped = 0

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def phase(self, description: str, total_bytes: int) -> None:
        with self._lock:
            self._progress.reset(self._task, description=description, total=total_bytes)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._progress.advance(self._task, nbytes)

    def skipped(self, nbytes: int) -> None:
        with self._lock:
            self._skipped += nbytes
            self._progress.update(self._task, skipped=f"{_size(self._skipped)} already present")


def _progress() -> RichProgress | NoProgress:
    return RichProgress() if sys.stdout.isatty() else NoProgress()


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"slipstream cache {args.action}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def run_save(args: argparse.Namespace) -> int:
    _check_key(args.key, "--key")
    base = Path.cwd()
    for path in args.paths:
        if not os.path.lexists(path):
            raise UsageError(f"{path} does not exist")
        resolved = os.path.normpath(base / path)
        if resolved != str(base) and not resolved.startswith(str(base) + os.sep):
            raise UsageError(f"{path} is outside the working directory {base}")
    started = time.monotonic()
    try:
        with (
            _connect(args) as channel,
            LayerClient(channel, workers=args.workers) as client,
            _progress() as progress,
        ):
            result = client.save(args.paths, args.key, overwrite=args.overwrite, progress=progress)
    except LayerExists:
        print(f"layer {args.key!r} already exists; not saved (use --overwrite to replace it)")
        return EXIT_OK
    except (CasError, LayerError) as exc:
        return _fail(args, str(exc))
    print(save_summary(result, time.monotonic() - started))
    return EXIT_OK


def save_summary(r: SaveResult, seconds: float) -> str:
    """The one-line report of a save."""
    verb = "replaced" if r.replaced else "saved"
    return (
        f"{verb} {r.key!r}: {r.files:,} files, {r.symlinks:,} symlinks, {r.directories:,} dirs, "
        f"{_size(r.file_bytes)}; uploaded {r.uploaded_blobs:,} of {r.blobs:,} blobs, "
        f"{_size(r.uploaded_bytes)} ({_size(r.wire_bytes)} on the wire) in {seconds:.1f}s"
    )


def _limits(args: argparse.Namespace) -> TreeLimits:
    if args.max_entries < 1:
        raise UsageError("--max-entries must be at least 1")
    if not 1 <= args.max_depth <= MAX_DEPTH_LIMIT:
        raise UsageError(f"--max-depth must be 1 to {MAX_DEPTH_LIMIT}")
    sizes = {}
    for flag in ("--max-bytes", "--max-tree-bytes"):
        try:
            sizes[flag] = parse_size(getattr(args, flag[2:].replace("-", "_")))
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
    return TreeLimits(
        args.max_entries, args.max_depth, sizes["--max-bytes"], sizes["--max-tree-bytes"]
    )


def run_restore(args: argparse.Namespace) -> int:
    _check_key(args.key, "--key")
    limits = _limits(args)
    for prefix in args.restore_key:
        _check_key(prefix, "--restore-key")
    if args.into.exists() and not args.into.is_dir():
        raise UsageError(f"--into {args.into} is not a directory")
    started = time.monotonic()
    try:
        with (
            _connect(args) as channel,
            LayerClient(
                channel, workers=args.workers, strict_symlinks=args.strict_symlinks, limits=limits
            ) as client,
            _progress() as progress,
        ):
            result = client.restore(args.key, args.restore_key, args.into, progress=progress)
    except UnsafeTree as exc:
        return _fail(args, f"refusing to restore an unsafe tree: {exc}")
    except IncompleteTree as exc:
        return _fail(args, str(exc))
    except (CasError, LayerError) as exc:
        return _fail(args, str(exc))
    except OSError as exc:
        return _fail(args, f"cannot write under {args.into}: {exc.strerror} ({exc.filename})")
    print(restore_summary(result, time.monotonic() - started))
    if not args.exit_code:
        return EXIT_OK
    return {"exact": EXIT_OK, "partial": EXIT_PARTIAL, "miss": EXIT_MISS}[result.hit]


def restore_summary(r: RestoreResult, seconds: float) -> str:
    """The one-line report of a restore."""
    if r.hit == "miss":
        return "cache-hit: miss; no layer matched, nothing restored"
    return (
        f"cache-hit: {r.hit}; restored {r.key!r}: {r.files:,} files, {r.symlinks:,} symlinks, "
        f"{r.directories:,} dirs; wrote {r.written_files:,} files ({_size(r.written_bytes)}, "
        f"{_size(r.wire_bytes)} on the wire), skipped {r.skipped_files:,} already present "
        f"({_size(r.skipped_bytes)}) in {seconds:.1f}s"
    )
