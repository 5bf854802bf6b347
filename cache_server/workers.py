"""`slipstream serve --workers N`: N processes serving the same ports and the same store.

A Python process serves on one core; N worker processes serve on N. The process
started is their supervisor, which serves no calls itself:

- Ports. It binds each port (gRPC, --http-listen, --health-listen) first, without
  SO_REUSEPORT, so a port another process holds is refused as with one worker
  (and port 0 picks one port for all), then marks its socket SO_REUSEPORT and keeps
  it, bound but never listening. The workers bind the same port with SO_REUSEPORT
  and the kernel spreads connections over them. Only processes of the same user
  that set SO_REUSEPORT themselves could join; another `slipstream serve` is refused.
- The store. The supervisor keeps the one LRU index of the disk store's directory
  (or the disk tier's in front of S3): the accountant of storage/shared_index.py.
  Workers find and read through the filesystem and report to it. `memory://` cannot
  be shared and is refused.
- Metrics. With --metrics-listen, the supervisor serves /metrics: the workers' call
  metrics summed (prometheus_client's multiprocess mode, in a temporary
  PROMETHEUS_MULTIPROC_DIR), the store-wide figures of the accountant and the
  workers' store and S3 call counts summed; process metrics are the supervisor's.
- Start and stop. It prints the start-up lines once, when every worker serves.
  SIGTERM or SIGINT stops the workers (each drains its calls, as one server does),
  then the supervisor. A worker that dies is started anew, unless it ran less than
  RESTART_WITHIN seconds: then the supervisor stops the others and exits 1.
- OCI upload sessions. With --http-listen, it gives the workers one directory for
  them (tmp/oci-sessions/ in the disk store or tier, else a temporary one), emptied
  at start and removed at the end: a session is a file there, and any worker takes
  any request of it (services/oci_sessions.py).
- Per process: ByteStream uploads in progress (a resumed upload landing on
  another worker starts again from the beginning), the existence cache in front of
  S3, and each worker's own memory limits (--max-streams counts per worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import pathlib
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

from slipstream.cache_server.logs import announce, setup_logging
from slipstream.cache_server.metrics import serve_registry, workers_registry
from slipstream.cache_server.server import (
    ServerConfig,
    disk_directory,
    freeze_start_up_objects,
    keep_freed_memory,
    open_store,
    start_server,
    start_up_lines,
)
from slipstream.cache_server.services.oci_sessions import clear_shared_sessions, shared_sessions_dir
from slipstream.cache_server.storage.disk import DiskStore
from slipstream.cache_server.storage.disk_index import LocalIndex
from slipstream.cache_server.storage.shared_index import (
    FIGURES,
    Accountant,
    Figures,
    Reporter,
    SharedIndex,
)
from slipstream.core.errors import UsageError

START_TIMEOUT = 120.0  # seconds for every worker to serve
STOP_TIMEOUT = 15.0  # seconds for the workers to stop once told (each drains for 5)
RESTART_WITHIN = 5.0  # a worker dying sooner after its start stops the server
_READY, _ERROR = "ready ", "error "
_PORT_IN_USE = "the port is in use or the host is not this machine's"


def parse_workers(text: str) -> int:
    """The --workers value: a whole number of at least 1, or "auto" (one per core this
    process may run on); UsageError saying why not."""
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0))
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UsageError(f"--workers {text!r}: give a whole number of at least 1, or auto")
    return int(text)


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What a worker process is started with."""

    config: ServerConfig
    log_level: str
    log_format: str


def _reserve(listen: str, held: list[socket.socket], refusal: str) -> str:
    """Bind listen's address(es) as one server would (refused if another process holds
    the port), then open the socket to the workers (SO_REUSEPORT) and keep it in held.
    Returns listen with the port bound (the one picked, for port 0)."""
    host, _, port_text = listen.rpartition(":")
    port = int(port_text)
    try:
        found = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as exc:
        raise OSError(refusal.format(listen=listen, reason=exc.strerror or exc)) from None
    return f"{host}:{port}"


def run_workers(config: ServerConfig, log_level: str, log_format: str) -> int:
    """Supervise config.workers worker processes until SIGTERM or SIGINT; the exit code."""
    held: list[socket.socket] = []
    try:
        listen = _reserve(config.listen, held, "cannot listen on {listen}: " + _PORT_IN_USE)
        http = config.http_listen and _reserve(
            config.http_listen, held, "cannot serve HTTP on {listen}: {reason}"
        )
        health = config.ops.health_listen and _reserve(
            config.ops.health_listen,
            held,
            "cannot serve health checks on {listen}: " + _PORT_IN_USE,
        )
        ops = dataclasses.replace(config.ops, metrics_listen=None, health_listen=health or None)
        worker_config = dataclasses.replace(
            config, listen=listen, http_listen=http or None, ops=ops
        )
        return Supervisor(WorkerPlan(worker_config, log_level, log_format), config).run()
    finally:
        for sock in held:
            sock.close()


@dataclasses.dataclass
class _Worker:
    number: int
    process: Any  # multiprocessing's SpawnProcess
    connection: socket.socket  # the supervisor's end of its line
    started: float


class Supervisor:
    """Starts the workers, keeps the accountant, restarts or stops them."""

    def __init__(self, plan: WorkerPlan, config: ServerConfig) -> None:
        self.plan = plan
        self.config = config
        self.count = plan.config.workers
        self.context = multiprocessing.get_context("spawn")
        self.figures: Figures = self.context.RawArray("q", FIGURES)
        self.stopping = threading.Event()
        self.serving = threading.Event()  # set once every worker serves
        self.messages: queue.Queue[tuple[int, str]] = queue.Queue()
        self.workers: list[_Worker] = []
        self.metrics_dir: str | None = None
        self.sessions_dir: pathlib.Path | None = None
        self.accountant = Accountant(None, None, self.figures)
        self.lines = itertools.count()  # the accountant's key of each worker started
        self.numbers: dict[int, int] = {}  # each key's worker number

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        metrics_server = None
        try:
            metrics_line = None
            if self.config.ops.metrics_listen:
                metrics_server, metrics_line = self._serve_metrics(self.config.ops.metrics_listen)
            directory = disk_directory(self.plan.config)
            if directory is not None:
                root, bound = directory
                index = DiskStore(root, bound, sync=self.plan.config.fsync).index  # the layout
                assert isinstance(index, LocalIndex)
                self.accountant.index, self.accountant.max_size = index, bound
                # The workers serve while it loads; the figures go out again once loaded.
                # Its scan waits for them to serve: on a busy machine it took their start
                # from ~1 s to ~10 s at a million entries.
                index.start_loading(on_loaded=self.accountant.publish, after=self.serving)
                self.accountant.publish()
            if self.config.http_listen:
                self._share_upload_sessions(None if directory is None else directory[0])
            self.workers = [self._start(n) for n in range(self.count)]
            ready = self._wait_ready()
            if ready is None:
                return 0  # stopped while starting
            self.serving.set()
            for worker in self.workers:  # their time to run counts from here
                worker.started = time.monotonic()
            own = [f"{self.count} worker processes share the ports and the store"]
            if metrics_line:
                own.append(metrics_line)
            lines = ready[:1] + own + ready[1:]
            for line in lines:
                announce(line)
            code = self._supervise()
            announce("shutting down")
            return code
        finally:
            self._stop_all()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            if self.sessions_dir is not None:
                shutil.rmtree(self.sessions_dir, ignore_errors=True)

    def _serve_metrics(self, listen: str) -> tuple[Any, str]:
        # Before any worker starts: they find the directory in their environment.
        self.metrics_dir = tempfile.mkdtemp(prefix="slipstream-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        registry = workers_registry(self.metrics_dir, self.accountant)
        try:
            server, url = serve_registry(registry, listen)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
        return server, f"metrics on {url}"

    def _share_upload_sessions(self, root: pathlib.Path | None) -> None:
        """Give the workers one directory for the OCI upload sessions, so that any of
        them takes any request of a session: tmp/oci-sessions/ in the disk store (or
        tier), else a temporary directory; emptied of a previous server's sessions."""
        if root is None:
            self.sessions_dir = pathlib.Path(tempfile.mkdtemp(prefix="slipstream-oci-sessions-"))
        else:
            self.sessions_dir = shared_sessions_dir(root)
        clear_shared_sessions(self.sessions_dir)
        config = dataclasses.replace(self.plan.config, upload_sessions_dir=self.sessions_dir)
        self.plan = dataclasses.replace(self.plan, config=config)

    def _start(self, number: int) -> _Worker:
        mine, theirs = socket.socketpair()
        process = self.context.Process(
            target=worker_main,
            args=(self.plan, theirs, self.figures),
            name=f"slipstream-worker-{number}",
        )
        process.start()
        theirs.close()
        # The first ones' keys are their numbers; one started anew has a key of its own,
        # so that what its predecessor said stays apart.
        key = next(self.lines)
        self.numbers[key] = number
        self.accountant.follow(key, mine, self._message)
        return _Worker(number, process, mine, time.monotonic())

    def _message(self, key: int, text: str) -> None:
        self.messages.put((self.numbers[key], text))

    def _wait_ready(self) -> list[str] | None:
        """The first worker's start-up lines once every worker serves; None if told to
        stop first. UsageError for a worker's start-up error (one line)."""
        deadline = time.monotonic() + START_TIMEOUT
        ready: dict[int, list[str]] = {}
        while len(ready) < self.count:
            if self.stopping.is_set():
                return None
            try:
                number, text = self.messages.get(timeout=0.1)
            except queue.Empty:
                self._check_starting(ready, deadline)
                continue
            if text.startswith(_ERROR):
                raise UsageError(text[len(_ERROR) :])
            if text.startswith(_READY):
                ready[number] = json.loads(text[len(_READY) :])
        return ready[0]

    def _check_starting(self, ready: dict[int, list[str]], deadline: float) -> None:
        """Exit 1 (or UsageError, with what it said) if a worker died while starting."""
        for worker in self.workers:
            code = worker.process.exitcode
            if code is not None and worker.number not in ready:
                self._drain_errors()
                print(
                    f"slipstream: worker {worker.number} exited with code {code} while starting",
                    file=sys.stderr,
                )
                raise SystemExit(1)
        if time.monotonic() > deadline:
            raise OSError(f"the workers did not start within {START_TIMEOUT:.0f} s")

    def _drain_errors(self) -> None:
        """A worker's start-up error, if it said one: UsageError with it."""
        time.sleep(0.1)  # its last line may still be on its way
        with contextlib.suppress(queue.Empty):
            while True:
                _, text = self.messages.get_nowait()
                if text.startswith(_ERROR):
                    raise UsageError(text[len(_ERROR) :])

    def _supervise(self) -> int:
        """Until told to stop: 0; or 1 once a worker died soon after its start."""
        while not self.stopping.wait(0.2):
            with contextlib.suppress(queue.Empty):
                while True:
                    number, text = self.messages.get_nowait()
                    if text.startswith(_ERROR):
                        print(
                            f"slipstream: worker {number}: {text[len(_ERROR) :]}", file=sys.stderr
                        )
            for i, worker in enumerate(self.workers):
                code = worker.process.exitcode
                if code is None or self.stopping.is_set():
                    continue
                self._retire(worker)
                ran = time.monotonic() - worker.started
                said = (
                    f"slipstream: worker {worker.number} (pid {worker.process.pid}) exited "
                    f"with code {code} after {ran:.0f} s"
                )
                if ran < RESTART_WITHIN:
                    print(f"{said}: stopping the server", file=sys.stderr, flush=True)
                    return 1
                print(f"{said}: starting another", file=sys.stderr, flush=True)
                self.workers[i] = self._start(worker.number)
        return 0

    def _retire(self, worker: _Worker) -> None:
        if self.metrics_dir is not None and worker.process.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def _stop_all(self) -> None:
        """SIGTERM to every worker; those still running after STOP_TIMEOUT are killed."""
        for worker in self.workers:
            if worker.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join(5)
            worker.connection.close()
        self.workers = []


# ---- in a worker process ----
def worker_main(plan: WorkerPlan, connection: socket.socket, figures: Figures) -> None:
    """A worker process: serve plan.config until SIGTERM, SIGINT or the supervisor's end."""
    setup_logging(plan.log_level, plan.log_format)
    # Ctrl-C at a terminal reaches every process of the group: each stops in order.
    code = 130
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(_serve_worker(plan.config, connection, figures))
    sys.stdout.flush()
    raise SystemExit(code)


async def _serve_worker(config: ServerConfig, connection: socket.socket, figures: Figures) -> int:
    keep_freed_memory()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def lost() -> None:  # the supervisor is gone: stop as if told to
        loop.call_soon_threadsafe(stopping.set)

    reporter = Reporter(connection, lost)
    directory = disk_directory(config)
    index = None if directory is None else SharedIndex(directory[0], reporter, figures)
    try:
        store = open_store(config, index)
        description = store.describe()
        server = await start_server(config, store)
    except (OSError, UsageError) as exc:
        reporter.send(f"!{_ERROR}{' '.join(str(exc).split())}\n")
        reporter.close()
        return 2
    reporter.counts = lambda: {"operations": store.operation_counts(), "s3": store.request_counts()}
    freeze_start_up_objects()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    lines = start_up_lines(description, server.ops.describe(), server)
    reporter.send(f"!{_READY}{json.dumps(lines)}\n")
    await stopping.wait()
    await server.stop()
    reporter.close()
    return 0
