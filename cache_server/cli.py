"""`slipstream serve`: run the cache server."""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import stat

from slipstream.cache_server import config as settings
from slipstream.cache_server.logs import setup_logging
from slipstream.cache_server.server import ServerConfig, serve
from slipstream.core.addresses import DEFAULT_LISTEN
from slipstream.core.errors import UsageError
from slipstream.core.sizes import parse_duration, parse_size

MEMORY_URL = "memory://"
STORAGE_SCHEMES = ("memory", "s3")  # --storage SCHEME://...; anything else is a directory


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the build cache server (REAPI v2 over gRPC)",
        description="Run the build cache server: REAPI v2 CAS, ActionCache, ByteStream, "
        "Capabilities.",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    p.add_argument(
        "--storage",
        metavar="DIR|s3://BUCKET[/PREFIX]|memory://",
        help="directory of the local disk store (default: ~/.cache/slipstream, or "
        "$XDG_CACHE_HOME), an S3 bucket (credentials: AWS environment, profile or role), "
        "or memory:// for RAM only (contents are lost at exit)",
    )
    s3 = p.add_argument_group("S3 storage (with --storage s3://...)")
    s3.add_argument("--s3-endpoint", metavar="URL", help="endpoint of an S3-compatible store")
    s3.add_argument("--s3-region", metavar="REGION", help="bucket region (default: AWS config)")
    s3.add_argument(
        "--s3-addressing", choices=("path", "virtual"), help="bucket addressing (default: auto)"
    )
    s3.add_argument(
        "--s3-timeout", metavar="SECONDS", type=float, default=10.0, help="connect/read timeout"
    )
    s3.add_argument(
        "--s3-max-attempts", metavar="N", type=int, default=5, help="attempts per S3 request"
    )
    s3.add_argument(
        "--cache-dir", type=pathlib.Path, metavar="DIR", help="a local disk tier in front of S3"
    )
    s3.add_argument("--cache-size", metavar="SIZE", help="size bound of the disk tier, e.g. 50G")
    p.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        help="also serve a Bazel HTTP cache, ccache remote storage and an OCI registry here "
        "(same store and tokens; port 0 picks a free one)",
    )
    p.add_argument(
        "--registry-upstream",
        action="append",
        metavar="[PREFIX=]URL",
        help="pull-through mirror: an image the registry at /v2/ lacks is fetched from the "
        "registry at URL (repositories under PREFIX/ only, named there without it); repeatable",
    )
    p.add_argument(
        "--registry-tag-ttl",
        type=float,
        metavar="SECONDS",
        help="how long a tag fetched from an upstream is served before asking it again "
        "(default 300)",
    )
    p.add_argument(
        "--registry-upstream-auth-file",
        metavar="FILE",
        help='credentials for private upstreams: a Docker config.json (its "auths" by '
        "registry host, as `docker login` writes them)",
    )
    p.add_argument("--max-size", metavar="SIZE", help="size bound with LRU eviction, e.g. 10G")
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="acknowledge disk writes before they reach the device: faster, but a power cut "
        "or VM crash can lose acknowledged blobs and results (for throwaway caches)",
    )
    p.add_argument(
        "--read-only-ac",
        action="store_true",
        help="refuse UpdateActionResult (clients may still upload CAS blobs)",
    )
    p.add_argument(
        "--upload-idle-timeout",
        metavar="DURATION",
        default="60s",
        help="drop a ByteStream upload or an OCI upload session that receives nothing this "
        "long, open or left for a resume (default 60s)",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        default="1",
        help="processes serving the same ports and store, one per core to use (default 1; "
        "auto: one per core); a disk store's size bound and LRU hold across them",
    )
    p.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    settings.add_arguments(p)
    settings.layered(p)  # after every option: the config file and SLIPSTREAM_* fill them in
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    settings.apply_layers(args)
    try:
        max_size = parse_size(args.max_size) if args.max_size else None
    except ValueError as exc:
        raise UsageError(f"--max-size: {exc}") from None
    try:
        upload_idle_timeout = parse_duration(args.upload_idle_timeout)
    except ValueError as exc:
        raise UsageError(f"--upload-idle-timeout: {exc}") from None
    listen = settings.check_listen(args.listen, "--listen")
    http = settings.check_listen(args.http_listen, "--http-listen")
    upstreams = tuple(args.registry_upstream or ())
    if upstreams:
        if http is None:
            raise UsageError(
                "--registry-upstream needs --http-listen (the registry is served there)"
            )
        from slipstream.cache_server.services.oci_upstream import parse_upstream, read_auth_file

        for upstream in upstreams:
            try:
                parse_upstream(upstream)
            except ValueError as exc:
                raise UsageError(f"--registry-upstream {exc}") from None
        if args.registry_upstream_auth_file:
            try:
                read_auth_file(args.registry_upstream_auth_file)
            except ValueError as exc:
                raise UsageError(f"--registry-upstream-auth-file {exc}") from None
    elif args.registry_upstream_auth_file:
        raise UsageError("--registry-upstream-auth-file needs --registry-upstream")
    tag_ttl = 300.0 if args.registry_tag_ttl is None else args.registry_tag_ttl
    if tag_ttl < 0:
        raise UsageError("--registry-tag-ttl must not be negative")
    in_memory = (args.storage or "").startswith(MEMORY_URL)
    if in_memory and args.storage != MEMORY_URL:
        raise UsageError(f"--storage {args.storage!r}: write just {MEMORY_URL} for RAM storage")
    scheme, sep, _ = (args.storage or "").partition("://")
    if sep and scheme not in STORAGE_SCHEMES:
        raise UsageError(
            f"--storage {args.storage!r}: unknown scheme {scheme + sep!r} "
            "(a directory, s3://BUCKET[/PREFIX] or memory://)"
        )
    from slipstream.cache_server.workers import parse_workers, run_workers

    workers = parse_workers(str(args.workers))
    if workers > 1 and in_memory:
        raise UsageError(
            f"--storage {MEMORY_URL} cannot be shared by --workers {workers} processes "
            "(each would have its own memory): give a directory, or run one worker"
        )
    log_level = settings.check_log_level(args.log_level)
    setup_logging(log_level, args.log_format)
    config = ServerConfig(
        listen=listen or DEFAULT_LISTEN,
        storage=pathlib.Path(args.storage) if args.storage and not in_memory else None,
        in_memory=in_memory,
        max_size=max_size,
        update_enabled=not args.read_only_ac,
        ops=settings.ops_config(args),
        http_listen=http,
        upload_idle_timeout=upload_idle_timeout,
        fsync=not args.no_fsync,
        registry_upstreams=upstreams,
        registry_tag_ttl=tag_ttl,
        registry_upstream_auth_file=args.registry_upstream_auth_file,
        workers=workers,
    )
    _configure_s3(args, config)
    for flag, directory in (("--storage", config.storage), ("--cache-dir", config.cache_dir)):
        if directory is not None:
            _check_directory(flag, directory)
    try:
        if workers > 1:
            return run_workers(config, log_level, args.log_format)
        asyncio.run(serve(config))
    except OSError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _check_directory(flag: str, path: pathlib.Path) -> None:
    """UsageError unless path is a directory or can be made one."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise UsageError(f"{flag} {path}: a part of that path is a file") from None
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        raise UsageError(f"{flag} {path} is not a directory")


def _configure_s3(args: argparse.Namespace, config: ServerConfig) -> None:
    """Check the S3 and tier flags and fill them into config."""
    s3_flags = ("s3_endpoint", "s3_region", "s3_addressing", "cache_dir", "cache_size")
    if not (args.storage or "").startswith("s3://"):
        used = [f"--{f.replace('_', '-')}" for f in s3_flags if getattr(args, f) is not None]
        if used:
            raise UsageError(f"{used[0]} needs --storage s3://BUCKET")
        return
    from slipstream.cache_server.storage.s3 import S3Config, parse_s3_url

    try:
        bucket, prefix = parse_s3_url(args.storage)
    except ValueError as exc:
        raise UsageError(f"--storage: {exc}") from None
    if args.max_size:
        raise UsageError("--max-size is for a disk store; bound the disk tier with --cache-size")
    if args.s3_endpoint and not args.s3_endpoint.startswith(("http://", "https://")):
        raise UsageError(f"--s3-endpoint {args.s3_endpoint!r} is not an http:// or https:// URL")
    if args.s3_timeout <= 0 or args.s3_max_attempts < 1:
        raise UsageError("--s3-timeout must be positive and --s3-max-attempts at least 1")
    if args.cache_size and not args.cache_dir:
        raise UsageError("--cache-size needs --cache-dir")
    try:
        config.cache_size = parse_size(args.cache_size) if args.cache_size else None
    except ValueError as exc:
        raise UsageError(f"--cache-size: {exc}") from None
    config.storage = None
    config.cache_dir = args.cache_dir
    config.s3 = S3Config(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=args.s3_endpoint,
        region=args.s3_region,
        addressing=args.s3_addressing or "auto",
        max_attempts=args.s3_max_attempts,
        timeout=args.s3_timeout,
    )
