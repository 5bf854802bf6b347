"""Assemble and run the gRPC server: storage, services, health, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import pathlib
import platform
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from slipstream.cache_server.config import OpsConfig
from slipstream.cache_server.logs import announce
from slipstream.cache_server.operations import NO_REUSEPORT, Operations
from slipstream.cache_server.services.action_cache import ActionCacheService
from slipstream.cache_server.services.bytestream import UPLOAD_IDLE_TIMEOUT, ByteStreamService
from slipstream.cache_server.services.bytestream import add_to_server as add_bytestream_to_server
from slipstream.cache_server.services.capabilities import CapabilitiesService
from slipstream.cache_server.services.cas import CasService
from slipstream.cache_server.services.cas import add_to_server as add_cas_to_server
from slipstream.cache_server.services.common import (
    FOREIGN_SERVICES,
    MAX_MESSAGE_SIZE,
    Backend,
    RejectMalformed,
    TolerantDecoding,
)
from slipstream.cache_server.services.layers import LayersService
from slipstream.cache_server.services.oci_sessions import remove_shared_sessions
from slipstream.cache_server.services.split import SplitService
from slipstream.cache_server.storage.base import Store
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.disk_index import DiskIndex
from slipstream.core.addresses import DEFAULT_LISTEN
from slipstream.protos import bytestream_pb2, remote_execution_pb2
from slipstream.protos import layers_pb2_grpc as layers_grpc
from slipstream.protos import remote_execution_pb2_grpc as re_grpc
from slipstream.protos import split_pb2_grpc as split_grpc

if TYPE_CHECKING:
    from slipstream.cache_server.http_endpoint import HttpEndpoint
    from slipstream.cache_server.storage.s3 import S3Config

log = logging.getLogger("cache_server")


@dataclass
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    storage: pathlib.Path | None = None
    in_memory: bool = False  # `--storage memory://`: a MemoryStore, not `storage`
    max_size: int | None = None
    update_enabled: bool = True
    worker_threads: int = 16
    s3: S3Config | None = None  # when set, the store is this bucket, not `storage`
    cache_dir: pathlib.Path | None = None  # a disk tier in front of S3
    cache_size: int | None = None
    ops: OpsConfig = field(default_factory=OpsConfig)  # auth, TLS, limits, metrics, audit
    http_listen: str | None = None  # also serve the HTTP caches (Bazel, ccache, build tools) here
    upload_idle_timeout: float = UPLOAD_IDLE_TIMEOUT  # seconds
    fsync: bool = True  # writes durable on disk before they are acknowledged
    registry_upstreams: tuple[str, ...] = ()  # the registry's pull-through mirror: [PREFIX=]URL
    registry_tag_ttl: float = 300.0  # seconds a mirrored tag is served before asking again
    registry_upstream_auth_file: str | None = None  # Docker config.json of upstream credentials
    workers: int = 1  # processes serving the same ports and store (cache_server/workers.py)
    # OCI upload sessions in this directory, which the workers share (set by their supervisor)
    upload_sessions_dir: pathlib.Path | None = None


def open_store(config: ServerConfig, disk_index: DiskIndex | None = None) -> Store:
    """The store config asks for, composed from its parts: a backend (memory, disk, S3),
    for S3 the existence cache and the disk tier in front, and outermost the counting of
    calls for the metrics. disk_index, if given, is the index of its disk directory (a
    worker's, shared with the others: storage/shared_index.py)."""
    from slipstream.cache_server.storage.counting import CountingStore

    return CountingStore(_open_backend(config, disk_index))


def disk_directory(config: ServerConfig) -> tuple[pathlib.Path, int | None] | None:
    """The directory of the disk store, or of the disk tier in front of S3, and its
    size bound; None for a store with no directory."""
    from slipstream.cache_server.storage.disk import default_storage_dir

    if config.in_memory:
        return None
    if config.s3 is None:
        return config.storage or default_storage_dir(), config.max_size
    if config.cache_dir is None:
        return None
    return config.cache_dir, config.cache_size


def _open_backend(config: ServerConfig, disk_index: DiskIndex | None) -> Store:
    from slipstream.cache_server.storage.disk import default_storage_dir

    if config.in_memory:
        from slipstream.cache_server.storage.memory import MemoryStore

        return MemoryStore(config.max_size)
    if config.s3 is None:
        return DiskStore(
            config.storage or default_storage_dir(),
            config.max_size,
            sync=config.fsync,
            index=disk_index,
        )
    # Imported here: boto3 takes a while to import and the disk store does not need it.
    from slipstream.cache_server.storage.existence_cache import ExistenceCache
    from slipstream.cache_server.storage.s3 import S3Store
    from slipstream.cache_server.storage.tiered import TieredStore

    s3 = S3Store(config.s3)
    try:
        s3.check_bucket()
        shared = ExistenceCache(s3, config.s3.known_present_entries, config.s3.known_present_ttl)
        if config.cache_dir is None:
            return shared
        return TieredStore(
            DiskStore(config.cache_dir, config.cache_size, sync=config.fsync, index=disk_index),
            shared,
        )
    except BaseException:
        s3.close()
        raise


SERVICE_NAMES = (
    remote_execution_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    remote_execution_pb2.DESCRIPTOR.services_by_name["ActionCache"].full_name,
    remote_execution_pb2.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name,
)


class CacheServer:
    """The running server; start() binds, wait() serves until stop()."""

    def __init__(self, config: ServerConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.executor = ThreadPoolExecutor(config.worker_threads, thread_name_prefix="store")
        self.backend = Backend(store, self.executor, update_enabled=config.update_enabled)
        shares_ports = config.workers > 1  # with the other workers: SO_REUSEPORT
        self.ops = Operations(config.ops, store, shares_ports=shares_ports)
        covered = ("/build.bazel.", "/google.bytestream.", "/slipstream.")
        self.server = grpc.aio.server(
            interceptors=[
                self.ops.interceptor(covered),
                TolerantDecoding(covered),
                RejectMalformed(FOREIGN_SERVICES),
            ],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
                *(() if shares_ports else (NO_REUSEPORT,)),
            ],
        )
        add_cas_to_server(CasService(self.backend), self.server)
        re_grpc.add_ActionCacheServicer_to_server(ActionCacheService(self.backend), self.server)
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(self.backend), self.server)
        add_bytestream_to_server(
            ByteStreamService(self.backend, config.upload_idle_timeout), self.server
        )
        layers_grpc.add_LayersServicer_to_server(LayersService(self.backend), self.server)
        split_grpc.add_SplitServicer_to_server(SplitService(self.backend), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        self.http: HttpEndpoint | None = None
        if config.http_listen is not None:
            from slipstream.cache_server.http_endpoint import (
                FRONT_ENDS,
                HttpEndpoint,  # aiohttp: only when asked for
            )
            from slipstream.cache_server.services.http_common import HttpOptions

            options = HttpOptions(
                config.registry_upstreams,
                config.registry_tag_ttl,
                config.registry_upstream_auth_file,
                config.upload_idle_timeout,
                None if config.upload_sessions_dir is None else str(config.upload_sessions_dir),
            )
            self.http = HttpEndpoint(self.backend, self.ops, FRONT_ENDS, options)

    async def start(self) -> None:
        self.port = self.ops.bind(self.server, self.config.listen)
        await self.server.start()
        await self.ops.start(self.health)
        if self.http is not None and self.config.http_listen is not None:
            await self.http.start(self.config.http_listen, reuse_port=self.config.workers > 1)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        self.backend.stopping.set()
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        await self.ops.stop(grace)
        self.executor.shutdown(wait=True)
        self.store.close()

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        if self.http is None or self.config.http_listen is None:
            return None
        host = self.config.http_listen.rsplit(":", 1)[0]
        scheme = "http" if self.config.ops.tls is None else "https"
        return f"{scheme}://{host}:{self.http.port}"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def keep_freed_memory(
    mmap_threshold: int = 8 << 20, trim_threshold: int = 16 << 20, arenas: int = 2
) -> bool:
    """Have glibc's malloc keep freed memory for reuse; False where that is not glibc.

    Blob data moves through the server in buffers of about 1 MiB. With glibc's
    defaults such a buffer can be mapped fresh from the kernel and handed back when
    freed, so every chunk pays page faults on memory it just had; on this VM that
    halved ByteStream read rates (benchmarks/README.md). Buffers under
    mmap_threshold now come from the heap, and up to trim_threshold of freed heap
    per arena stays mapped. Both must be set: either alone is slower than neither.
    At most `arenas` heaps are kept (glibc's default is 8 per core): each holds its
    own freed memory, and the GIL lets few threads allocate at once anyway.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        and mallopt(_M_ARENA_MAX, arenas)
    )


def freeze_start_up_objects() -> None:
    """Keep what exists once the server is built out of every later garbage collection.

    Modules, gRPC's and protobuf's tables and the store's index live as long as the
    process, yet every full collection of CPython's cycle collector walked them all:
    10-16 ms pauses on this server, which cost FindMissingBlobs of 1,000 digests ~30%
    on the memory store (benchmarks/README.md). Collection thresholds stay CPython's:
    raising them (tried: 10,000-50,000) let each call's state wait longer for the
    collector, and a server taking 4 MiB uploads grew by ~1 MiB per call between
    collections. Frozen objects that later become unused are still freed by
    reference counting.

    Called again once the disk store's index has loaded in the background (after the
    server started): a full collection walked an index of a million entries in ~57 ms
    here, nothing once it was frozen. What calls in flight hold then is frozen with it:
    still freed by reference counting, but a cycle among it never.
    """
    gc.freeze()


def start_up_lines(description: str, ops: list[str], server: CacheServer) -> list[str]:
    """What `slipstream serve` says once it serves, in order: the gRPC line, which tells
    waiting scripts (and tests) that the server is up, comes last."""
    lines = [f"storing in the {description}", *ops]
    if server.http_url is not None:
        lines.append(
            "serving the HTTP cache (Bazel, ccache, Turborepo, Nx, sccache, "
            f"OCI registry) on {server.http_url}"
        )
    lines.append(f"serving the REAPI v2 cache on {server.address} ({server.ops.transport})")
    return lines


async def start_server(config: ServerConfig, store: Store) -> CacheServer:
    """A CacheServer of store, listening; OSError saying why if it cannot."""
    server = CacheServer(config, store)
    try:
        await server.start()
    except RuntimeError:
        store.close()
        raise OSError(
            f"cannot listen on {config.listen}: "
            "the port is in use or the host is not this machine's"
        ) from None
    except OSError:
        await server.stop(0)
        raise
    return server


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    keep_freed_memory()
    store = open_store(config)
    directory = disk_directory(config)
    if directory is not None:
        remove_shared_sessions(directory[0])
    # The disk store's index loads in the background: the server answers at once,
    # finds on worker threads until it is loaded (Store.finds_in_memory).
    store.start_loading(on_loaded=freeze_start_up_objects)
    description = store.describe()
    server = await start_server(config, store)
    freeze_start_up_objects()
    # Before the ready line: a script that stops the server as soon as it reads
    # that line must reach the handler, not the default action that kills it.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # Everything else is said before the gRPC line, which tells waiting
    # scripts (and tests) that the server is up.
    for line in start_up_lines(description, server.ops.describe(), server):
        announce(line)
    await stopping.wait()
    announce("shutting down")
    await server.stop()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
