"""A fleet on one cache: many concurrent clients on a disk store of a million blobs,
Slipstream beside BuildGrid with the same store contents and the same clients, and the
reference server (the thinnest Python gRPC cache: the ceiling) under the same load.

    python -m benchmarks.bench_fleet [--blobs N] [--clients C] [--duration S] [--rounds R]
                                     [--client-processes P] [--no-fsync] [--smoke]
                                     [--workers N] [--rate R[,R...]]
                                     [--reference KIND[,KIND]] [--no-reference]
                                     [--json PATH] [--storage-dir DIR]
                                     [--buildgrid-venv DIR] [--no-buildgrid]

Fills both disk stores with the same N small blobs (benchmarks/fleet_store.py; N/100
action results, in Slipstream's store on disk and sent to BuildGrid's in-memory action
cache with UpdateActionResult), adds four 1 MiB blobs to each, starts both servers, then
loads each in turns (R rounds, the order flipping every round, S seconds per server in
all) with C concurrent clients: P client processes (spawned), each running C/P clients on
grpc.aio, every client on its own connection, each issuing bench_cache's mix back to back:
  30% FindMissingBlobs of 100 digests (50 of the filled blobs, 50 absent)
  20% BatchReadBlobs of 10 filled blobs      20% BatchUpdateBlobs of 10 new 4 KiB blobs
  15% GetActionResult of a filled action (its outputs checked by the server)
   5% UpdateActionResult of a new action     10% ByteStream Read of a 1 MiB blob
Reports ops/s, p50/p99 per operation and overall, errors, the server's CPU and the
clients' CPU (both in cores: CPU seconds per second), and the server's RSS sampled from
/proc every second (start, end and max of each phase; the JSON keeps every sample).
Target (issue 23): twice BuildGrid's throughput at 64 clients, a p99 under 50 ms, RSS flat.

That is the closed loop: every client waits for its answer before the next call, so a
server's queueing slows the offered load down with it. --rate R adds open-loop phases
after it: the clients together start R calls per second on a fixed schedule whatever
the answers (each call on the next client's connection; several may be in flight on
one), and a call's latency counts from its scheduled start, so queueing in the server
shows rather than being hidden by the clients waiting (coordinated omission). R is
calls/s, or Nx: N times BuildGrid's closed-loop throughput just measured. Each rate
loads each server once for --duration / --rounds seconds.
--workers N serves Slipstream with `serve --workers N`; its CPU and RSS are then the
sum over the supervisor and its workers (shared pages counted in each).

Slipstream runs as `slipstream serve` with its defaults (fsync on, where BuildGrid never
syncs; --no-fsync for durability like BuildGrid's); BuildGrid with bench_peers'
cache-only config (16 threads, 256 RPCs queued).
The reference server (benchmarks/reference_server.py: dicts in RAM, no checks) is loaded
in the same turns, on grpcio's threaded server (--reference threads, 16 threads) and/or
on grpc.aio (aio); it is filled through the wire with the same N blobs (BatchUpdateBlobs)
and action results (UpdateActionResult). The fastest one measured is the ceiling: R/B and
S/R compare it with BuildGrid and Slipstream.
--storage-dir defaults to the system's temp dir (a real disk here): a million small
files on a tmpfs would hold ~4 GB of RAM per store.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from benchmarks.bench_cache import machine
from benchmarks.bench_peers import (
    PeerUnavailable,
    buildgrid_server,
    ensure_buildgrid,
    reference_process,
)
from benchmarks.bench_split_peers import cache_dir
from benchmarks.fleet_store import (
    OUTPUTS_PER_ACTION,
    action_digest,
    action_result,
    blob_digest,
    fill_buildgrid,
    fill_over_grpc,
    fill_slipstream,
)
from slipstream.cache_server.storage.disk import filesystem_type
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import bytestream_pb2_grpc as bs_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc
from tests.support.proc_stats import cpu_seconds, rss_bytes, with_children
from tests.support.server_process import ServerProcess

SEED = 1
OPERATIONS = ("find", "read", "update", "get_ac", "update_ac", "stream")
_MIX = (0.30, 0.50, 0.70, 0.85, 0.90, 1.00)  # cumulative, in OPERATIONS' order
_POOL = 50_000  # filled blobs each client process draws from (their digests made once)
_BIG = 4  # 1 MiB blobs for ByteStream reads
# Open loop: calls one client process keeps in flight per client at most before it
# starts the next scheduled call late (its latency still counts from the schedule).
_IN_FLIGHT_PER_CLIENT = 8
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]
TARGET_RATIO = 2.0
TARGET_P99_MS = 50.0
# The reference server's kinds (--reference) and their phases' names.
REFERENCES = {"threads": "reference", "aio": "reference-aio"}
DEFAULT_REFERENCE = "aio"


@dataclass(frozen=True)
class Load:
    blobs: int = 1_000_000
    clients: int = 64
    duration: float = 120.0
    processes: int = 4
    rate: float | None = None  # open loop: calls/s offered by all clients together


SMOKE = Load(blobs=1_000, clients=4, duration=3.0, processes=2)


def _digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _big_blobs() -> list[bytes]:
    return [random.Random(k).randbytes(1 << 20) for k in range(_BIG)]


# ---- the clients: processes of many grpc.aio clients ----


@dataclass
class ClientReport:
    """What one client process measured: latencies (s) and errors per operation."""

    latencies: dict[str, array.array[float]]
    errors: dict[str, int]
    first_error: str
    cpu_seconds: float


class _Client:
    def __init__(self, channel: grpc.aio.Channel, rng: random.Random, pool: list[Any]) -> None:
        # The generated stubs serve both kinds of channel; the type stubs name the
        # async face apart.
        self.cas: re_grpc.ContentAddressableStorageAsyncStub = (
            re_grpc.ContentAddressableStorageStub(channel)  # type: ignore[assignment]
        )
        self.ac: re_grpc.ActionCacheAsyncStub = re_grpc.ActionCacheStub(channel)  # type: ignore[assignment]
        self.bytestream: bs_grpc.ByteStreamAsyncStub = bs_grpc.ByteStreamStub(channel)  # type: ignore[assignment]
        self.rng = rng
        self.pool = pool

    async def call(self, op: str, load: Load, actions: int, big: list[re_pb2.Digest]) -> None:
        rng = self.rng
        if op == "find":
            absent = [re_pb2.Digest(hash=os.urandom(32).hex(), size_bytes=100) for _ in range(50)]
            request = re_pb2.FindMissingBlobsRequest(
                blob_digests=rng.sample(self.pool, 50) + absent
            )
            missing = (await self.cas.FindMissingBlobs(request)).missing_blob_digests
            if len(missing) != len(absent):
                raise AssertionError(f"{len(missing)} missing of 50 absent")
        elif op == "read":
            batch = re_pb2.BatchReadBlobsRequest(digests=rng.sample(self.pool, 10))
            response = await self.cas.BatchReadBlobs(batch)
            if any(r.status.code != 0 for r in response.responses):
                raise AssertionError("a filled blob was not read")
        elif op == "update":
            blobs = [os.urandom(4096) for _ in range(10)]
            update = re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=_digest(b), data=b) for b in blobs
                ]
            )
            stored = await self.cas.BatchUpdateBlobs(update)
            if any(r.status.code != 0 for r in stored.responses):
                raise AssertionError("a blob was not stored")
        elif op == "get_ac":
            action = action_digest(SEED, rng.randrange(actions))
            await self.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
        elif op == "update_ac":
            result = re_pb2.ActionResult(
                exit_code=0,
                output_files=[
                    re_pb2.OutputFile(path=f"out/{k}", digest=d)
                    for k, d in enumerate(rng.sample(self.pool, OUTPUTS_PER_ACTION))
                ],
            )
            key = _digest(os.urandom(64))
            await self.ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(action_digest=key, action_result=result)
            )
        else:
            d = rng.choice(big)
            read = bs_pb2.ReadRequest(resource_name=f"blobs/{d.hash}/{d.size_bytes}")
            got = 0
            async for chunk in self.bytestream.Read(read):
                got += len(chunk.data)
            if got != d.size_bytes:
                raise AssertionError(f"read {got} of {d.size_bytes} bytes")


def _pick(rng: random.Random) -> str:
    """The next call of the mix."""
    r = rng.random()
    return OPERATIONS[next(k for k, p in enumerate(_MIX) if r < p)]


async def _run_clients(
    address: str, first: int, count: int, load: Load, actions: int, barrier: Any
) -> ClientReport:
    rng = random.Random(SEED * 1000 + first)
    pool = [blob_digest(SEED, i) for i in rng.sample(range(load.blobs), min(_POOL, load.blobs))]
    big = [_digest(b) for b in _big_blobs()]
    channels = [
        # A channel argument of its own: every client gets its own connection.
        grpc.aio.insecure_channel(address, options=[*_OPTIONS, ("slipstream.bench.client", i)])
        for i in range(first, first + count)
    ]
    latencies = {op: array.array("d") for op in OPERATIONS}
    errors = dict.fromkeys(OPERATIONS, 0)
    first_error = ""
    try:
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        barrier.wait()
        deadline = time.perf_counter() + load.duration
        cpu_start = time.process_time()

        async def timed(me: _Client, op: str, start: float) -> None:
            """One call; its latency from start (the schedule's time, in the open loop)."""
            nonlocal first_error
            try:
                await me.call(op, load, actions, big)
            except (grpc.RpcError, AssertionError) as e:
                errors[op] += 1
                first_error = first_error or f"{op}: {e!r}"[:500]
            else:
                latencies[op].append(time.perf_counter() - start)

        async def client(channel: grpc.aio.Channel, seed: int) -> None:
            me = _Client(channel, random.Random(seed), pool)
            while (now := time.perf_counter()) < deadline:
                await timed(me, _pick(me.rng), now)

        if load.rate is None:
            await asyncio.gather(*(client(ch, rng.randrange(2**32)) for ch in channels))
        else:
            clients = [_Client(ch, random.Random(rng.randrange(2**32)), pool) for ch in channels]
            # This process's share of the rate (its share of the clients'), its schedule
            # offset from the other processes'.
            interval = load.clients / (load.rate * count)
            start = deadline - load.duration + interval * first / load.clients
            in_flight: set[asyncio.Task[None]] = set()
            k = 0
            while (scheduled := start + k * interval) < deadline:
                if (wait := scheduled - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                while len(in_flight) >= _IN_FLIGHT_PER_CLIENT * count:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                me = clients[k % count]
                task = asyncio.create_task(timed(me, _pick(rng), scheduled))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                k += 1
            if in_flight:
                await asyncio.wait(in_flight)  # the last calls, measured to their end
        cpu = time.process_time() - cpu_start
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return ClientReport(latencies, errors, first_error, cpu)


def _client_process(
    address: str, first: int, count: int, load: Load, actions: int, barrier: Any, results: Any
) -> None:
    try:
        results.put(asyncio.run(_run_clients(address, first, count, load, actions, barrier)))
    except BaseException as e:
        barrier.abort()
        results.put(f"clients {first}-{first + count - 1}: {e!r}")
        raise


# ---- one phase: one server under the load ----


def _family_rss(pid: int) -> int:
    return sum(map(rss_bytes, with_children(pid)))


def _family_cpu(pid: int) -> float:
    return sum(map(cpu_seconds, with_children(pid)))


class RssSampler:
    """The RSS of a process and its children every `interval` seconds, on a thread,
    until stopped."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while True:
            self.samples.append((round(time.perf_counter() - start, 1), _family_rss(self.pid)))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, _family_rss(self.pid)))


@dataclass
class OpFigures:
    count: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class Phase:
    server: str
    seconds: float
    ops: int
    errors: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    per_op: dict[str, OpFigures]
    server_cpu_cores: float  # the server's CPU seconds per second of the phase
    client_cpu_cores: float  # the client processes' own, likewise
    rss_start_mib: float
    rss_end_mib: float
    rss_max_mib: float
    rss_samples: list[tuple[float, int]] = field(repr=False)
    first_error: str = ""
    offered_per_s: float | None = None  # the open loop's rate; None: the closed loop

    @property
    def label(self) -> str:
        if self.offered_per_s is None:
            return self.server
        return f"{self.server}@{self.offered_per_s:,.0f}/s"


def _percentile_ms(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))] * 1000, 2)


@dataclass
class Round:
    """One server under the load once: the clients' reports, the server's CPU and RSS."""

    reports: list[ClientReport]
    seconds: float
    server_cpu: float
    rss_samples: list[tuple[float, int]]


def load_round(address: str, pid: int, load: Load, actions: int) -> Round:
    """The load on the server at address (process pid) for load.duration seconds."""
    ctx = multiprocessing.get_context("spawn")  # grpc does not survive fork
    barrier = ctx.Barrier(load.processes + 1)
    results = ctx.Queue()
    share, extra = divmod(load.clients, load.processes)
    counts = [share + (k < extra) for k in range(load.processes)]
    firsts = [sum(counts[:k]) for k in range(load.processes)]
    procs = [
        ctx.Process(
            target=_client_process,
            args=(address, first, count, load, actions, barrier, results),
            daemon=True,
        )
        for first, count in zip(firsts, counts, strict=True)
        if count
    ]
    for p in procs:
        p.start()
    reports: list[ClientReport] = []
    try:
        barrier.wait(timeout=300)
        with RssSampler(pid) as rss:
            cpu_start, started = _family_cpu(pid), time.perf_counter()
            for _ in procs:
                got = results.get(timeout=load.duration + 300)
                if isinstance(got, str):
                    raise RuntimeError(f"the load failed: {got}")
                reports.append(got)
            seconds = time.perf_counter() - started
            server_cpu = _family_cpu(pid) - cpu_start
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return Round(reports, seconds, server_cpu, rss.samples)


def summarize(name: str, rounds: list[Round], rate: float | None = None) -> Phase:
    """One server's figures over all its rounds."""
    reports = [r for one in rounds for r in one.reports]
    seconds = sum(one.seconds for one in rounds)
    per_op = {}
    everything: list[float] = []
    for op in OPERATIONS:
        values = [v for r in reports for v in r.latencies[op]]
        everything += values
        per_op[op] = OpFigures(
            len(values),
            sum(r.errors[op] for r in reports),
            _percentile_ms(values, 50) if values else None,
            _percentile_ms(values, 99) if values else None,
        )
    samples: list[tuple[float, int]] = []
    offset = 0.0
    for one in rounds:  # one timeline: each round's samples after the last round's
        samples += [(round(offset + t, 1), b) for t, b in one.rss_samples]
        offset += one.seconds
    mib = [b / 2**20 for _, b in samples]
    return Phase(
        server=name,
        seconds=round(seconds, 2),
        ops=len(everything),
        errors=sum(f.errors for f in per_op.values()),
        ops_per_s=round(len(everything) / seconds, 1),
        p50_ms=_percentile_ms(everything, 50) if everything else 0.0,
        p99_ms=_percentile_ms(everything, 99) if everything else 0.0,
        per_op=per_op,
        server_cpu_cores=round(sum(one.server_cpu for one in rounds) / seconds, 2),
        client_cpu_cores=round(sum(r.cpu_seconds for r in reports) / seconds, 2),
        rss_start_mib=round(mib[0], 1),
        rss_end_mib=round(mib[-1], 1),
        rss_max_mib=round(max(mib), 1),
        rss_samples=samples,
        first_error=next((r.first_error for r in reports if r.first_error), ""),
        offered_per_s=rate,
    )


# ---- set-up: stores, servers, what the load reads ----


def _seed_server(address: str, actions: int, blobs: int, send_actions: bool) -> None:
    """The 1 MiB blobs the ByteStream reads fetch, and (for a server whose action cache
    is not on the filled disk) the filled action results."""
    with grpc.insecure_channel(address, options=_OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        for b in _big_blobs():
            request = re_pb2.BatchUpdateBlobsRequest(
                requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=_digest(b), data=b)]
            )
            assert all(r.status.code == 0 for r in cas.BatchUpdateBlobs(request).responses)
        if send_actions:
            ac = re_grpc.ActionCacheStub(channel)
            # 64 in flight at once: BuildGrid refuses calls past its limit (256).
            for start in range(0, actions, 64):
                futures = [
                    ac.UpdateActionResult.future(
                        re_pb2.UpdateActionResultRequest(
                            action_digest=action_digest(SEED, j),
                            action_result=action_result(SEED, j, blobs),
                        )
                    )
                    for j in range(start, min(actions, start + 64))
                ]
                for f in futures:
                    f.result(timeout=300)


@contextlib.contextmanager
def slipstream_on(store: pathlib.Path, fsync: bool, workers: int = 1) -> Iterator[ServerProcess]:
    flags = [] if fsync else ["--no-fsync"]
    server = ServerProcess(store, [*flags, "--workers", str(workers)] if workers > 1 else flags)
    server.start(timeout=300)  # the index of a million entries loads before the ready line
    try:
        yield server
    finally:
        try:
            server.stop(60)
        finally:
            server.kill()


def _buildgrid_pid(workdir: pathlib.Path) -> int:
    """The pid of the `bgd server start` running with workdir's config."""
    config = str(workdir / "buildgrid.yml")
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if config.encode() in cmdline and any(b"bgd" in part for part in cmdline[:2]):
                return int(proc.name)
    raise PeerUnavailable(f"no bgd process runs with {config}")


def print_phases(phases: list[Phase]) -> None:
    print(
        f"\n{'server':<22} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'server CPU':>10} {'client CPU':>10}  RSS MiB start/end/max"
    )
    for p in phases:
        print(
            f"{p.label:<22} {p.ops_per_s:>9,.1f} {p.p50_ms:>8} {p.p99_ms:>8} {p.errors:>7} "
            f"{p.server_cpu_cores:>10} {p.client_cpu_cores:>10}  "
            f"{p.rss_start_mib:,.0f} / {p.rss_end_mib:,.0f} / {p.rss_max_mib:,.0f}"
        )
    print(f"\n{'operation':<11} " + " ".join(f"{p.label + ' p50/p99 ms':>28}" for p in phases))
    for op in OPERATIONS:
        cells = []
        for p in phases:
            f = p.per_op[op]
            errors = f" ({f.errors} err)" if f.errors else ""
            cells.append(f"{f'{f.count:,}: {f.p50_ms} / {f.p99_ms}{errors}':>28}")
        print(f"{op:<11} " + " ".join(cells))
    for p in phases:
        if p.first_error:
            print(f"{p.label}'s first error: {p.first_error}")


def measure(
    workdir: pathlib.Path,
    load: Load,
    rounds: int,
    actions: int,
    bgd: pathlib.Path | None,
    fsync: bool,
    results: dict[str, Any],
    workers: int = 1,
    rates: tuple[str, ...] = (),
    references: tuple[str, ...] = (),
) -> list[Phase]:
    """Fill the stores under workdir, start the servers (and the reference servers of
    the kinds in references, filled through the wire), load each in turns (closed
    loop), then at each of rates (open loop)."""
    results["filesystem"] = filesystem_type(workdir)
    print(f"filling {workdir} with {load.blobs:,} blobs per store ...", flush=True)
    filled = fill_slipstream(workdir / "slipstream", load.blobs, actions, SEED)
    results["fill_seconds"] = {"slipstream": round(filled.seconds, 1)}
    print(f"  Slipstream's store: {filled.seconds:.0f}s", flush=True)
    if bgd is not None:
        bg_seconds = fill_buildgrid(workdir / "buildgrid" / "buildgrid-cas", load.blobs, SEED)
        results["fill_seconds"]["buildgrid"] = round(bg_seconds, 1)
        print(f"  BuildGrid's store: {bg_seconds:.0f}s", flush=True)
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        ours = stack.enter_context(slipstream_on(workdir / "slipstream", fsync, workers))
        results["slipstream_start_seconds"] = round(time.perf_counter() - started, 2)
        assert ours.proc is not None
        _seed_server(ours.address, actions, load.blobs, send_actions=False)
        servers = [("slipstream", ours.address, ours.proc.pid)]
        if bgd is not None:
            address = stack.enter_context(
                buildgrid_server(bgd, "disk", workdir / "buildgrid", None)
            )
            _seed_server(address, actions, load.blobs, send_actions=True)
            servers.append(("buildgrid", address, _buildgrid_pid(workdir / "buildgrid")))
        for kind in references:
            name = REFERENCES[kind]
            address, pid = stack.enter_context(reference_process(aio=kind == "aio"))
            with grpc.insecure_channel(address, options=_OPTIONS) as channel:
                seconds = fill_over_grpc(channel, load.blobs, SEED)
            results["fill_seconds"][name] = round(seconds, 1)
            print(f"  {name}: filled through the wire in {seconds:.0f}s", flush=True)
            _seed_server(address, actions, load.blobs, send_actions=True)
            servers.append((name, address, pid))
        # In turns (the order flipping every round), so both meet the same noise.
        each = dataclasses.replace(load, duration=load.duration / rounds)
        measured: dict[str, list[Round]] = {name: [] for name, _, _ in servers}
        for r in range(rounds):
            for name, address, pid in servers if r % 2 == 0 else servers[::-1]:
                print(
                    f"[{name}] round {r + 1}/{rounds}: {load.clients} clients in "
                    f"{load.processes} processes, {each.duration:.0f}s ...",
                    flush=True,
                )
                measured[name].append(load_round(address, pid, each, actions))
        phases = [summarize(name, measured[name]) for name, _, _ in servers]
        closed = {p.server: p.ops_per_s for p in phases}
        for k, text in enumerate(rates):
            rate = offered_rate(text, closed.get("buildgrid"))
            if rate is None:
                print(f"--rate {text} left out: BuildGrid's throughput was not measured")
                continue
            for name, address, pid in servers if k % 2 == 0 else servers[::-1]:
                print(
                    f"[{name}] open loop: {rate:,.0f} calls/s from {load.clients} clients, "
                    f"{each.duration:.0f}s ...",
                    flush=True,
                )
                one = load_round(address, pid, dataclasses.replace(each, rate=rate), actions)
                phases.append(summarize(name, [one], rate))
    return phases


def parse_rates(text: str | None) -> tuple[str, ...]:
    """--rate's values: calls/s, or Nx (N times BuildGrid's closed-loop throughput)."""
    if not text:
        return ()
    rates = tuple(part.strip() for part in text.split(","))
    for part in rates:
        try:
            value = float(part.removesuffix("x"))
        except ValueError:
            value = 0.0
        if not value > 0:
            raise ValueError(
                f"--rate {part!r}: give calls/s (300) or a multiple of BuildGrid's (2x)"
            )
    return rates


def offered_rate(text: str, buildgrid_ops_per_s: float | None) -> float | None:
    """The calls/s of one --rate value, given BuildGrid's closed-loop throughput (None
    for Nx without it)."""
    if not text.endswith("x"):
        return float(text)
    if not buildgrid_ops_per_s:
        return None
    return round(float(text[:-1]) * buildgrid_ops_per_s, 1)


def report(phases: list[Phase], results: dict[str, Any], out: pathlib.Path | None) -> None:
    """Print the phases and the verdict; write the results to out if given."""
    print_phases(phases)
    results["phases"] = [asdict(p) for p in phases]
    closed = {p.server: p for p in phases if p.offered_per_s is None}
    ours_p, theirs = closed.get("slipstream"), closed.get("buildgrid")
    if ours_p and theirs:
        ratio = ours_p.ops_per_s / theirs.ops_per_s if theirs.ops_per_s else None
        results["throughput_ratio"] = ratio
        results["p99_ratio"] = theirs.p99_ms / ours_p.p99_ms if ours_p.p99_ms else None
        met = ratio is not None and ratio >= TARGET_RATIO and ours_p.p99_ms < TARGET_P99_MS
        print(
            f"\nSlipstream / BuildGrid throughput: {ratio:.2f}x; p99 {ours_p.p99_ms} ms vs "
            f"{theirs.p99_ms} ms. Target ({TARGET_RATIO:.0f}x, p99 < {TARGET_P99_MS:.0f} ms): "
            f"{'met' if met else 'NOT met'}"
        )
    references = [p for name, p in closed.items() if name in REFERENCES.values()]
    if references:
        report_ceiling(max(references, key=lambda p: p.ops_per_s), ours_p, theirs, results)
    if results.get("buildgrid_unavailable"):
        print(f"BuildGrid not measured: {results['buildgrid_unavailable']}")
    for p in phases:
        if p.offered_per_s is not None:
            print(
                f"Open loop, {p.offered_per_s:,.0f} calls/s offered to {p.server}: "
                f"{p.ops_per_s:,.1f} done/s, p50 {p.p50_ms} ms, p99 {p.p99_ms} ms "
                f"(p99 < {TARGET_P99_MS:.0f} ms: {'yes' if p.p99_ms < TARGET_P99_MS else 'no'})"
            )
    if phases:
        rss = phases[0]
        print(
            f"Slipstream's RSS over its phase: {rss.rss_start_mib:,.0f} -> "
            f"{rss.rss_end_mib:,.0f} MiB (max {rss.rss_max_mib:,.0f}; median "
            f"{statistics.median(b for _, b in rss.rss_samples) / 2**20:,.0f})"
        )
    if out:
        out.write_text(json.dumps(results, indent=2) + "\n")


def report_ceiling(
    ceiling: Phase, ours: Phase | None, theirs: Phase | None, results: dict[str, Any]
) -> None:
    """The fastest reference server's closed loop beside the others: R/B, S/R, and
    whether it reaches the target at all."""
    clients = results["load"]["clients"]
    needed = clients / (TARGET_P99_MS / 1000)
    results["ceiling"] = ceiling.server
    line = (
        f"Ceiling ({ceiling.server}, no checks): {ceiling.ops_per_s:,.1f} ops/s, p99 "
        f"{ceiling.p99_ms} ms; a mean under {TARGET_P99_MS:.0f} ms at {clients} closed-loop "
        f"clients needs over {needed:,.0f} ops/s (Little's law)"
    )
    met = ceiling.p99_ms < TARGET_P99_MS
    if theirs and theirs.ops_per_s:
        results["reference_ratio"] = ceiling.ops_per_s / theirs.ops_per_s
        line += f"; R/B {results['reference_ratio']:.2f}x"
        met = met and results["reference_ratio"] >= TARGET_RATIO
    if ours and ceiling.ops_per_s:
        results["slipstream_of_reference"] = ours.ops_per_s / ceiling.ops_per_s
        line += f"; S/R {results['slipstream_of_reference']:.2f}"
    results["ceiling_meets_target"] = met
    verdict = "met" if met else "NOT met"
    print(f"{line}.\nThe target at the ceiling{'' if theirs else ' (p99 only)'}: {verdict}")


def parse_references(text: str) -> tuple[str, ...]:
    """--reference's kinds, each once, in REFERENCES' order."""
    kinds = {part.strip() for part in text.split(",")}
    if unknown := sorted(kinds - set(REFERENCES)):
        raise ValueError(f"--reference {unknown[0]!r}: give threads, aio or threads,aio")
    return tuple(k for k in REFERENCES if k in kinds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    full = Load()
    parser.add_argument("--smoke", action="store_true", help="1,000 blobs, 4 clients, 3 s")
    parser.add_argument("--blobs", type=int, help=f"blobs in each store (default {full.blobs:,})")
    parser.add_argument("--clients", type=int, help=f"concurrent clients (default {full.clients})")
    parser.add_argument(
        "--duration", type=float, help=f"seconds of load per server (default {full.duration:.0f})"
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        help=f"processes the clients run in (default {full.processes})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="turns per server, the order flipping each; --duration is their sum (default 2)",
    )
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    parser.add_argument(
        "--storage-dir", type=pathlib.Path, help="where both stores go (default the temp dir)"
    )
    parser.add_argument(
        "--buildgrid-venv",
        type=pathlib.Path,
        default=cache_dir() / "buildgrid-venv",
        help="BuildGrid's venv, created if missing (default ~/.cache/slipstream-bench/...)",
    )
    parser.add_argument("--no-buildgrid", action="store_true", help="Slipstream's side only")
    parser.add_argument(
        "--workers", type=int, default=1, help="Slipstream's `serve --workers N` (default 1)"
    )
    parser.add_argument(
        "--rate",
        help="open-loop phases after the closed loop, comma-separated: calls/s offered by "
        "all clients together, or Nx for N times BuildGrid's closed-loop throughput",
    )
    parser.add_argument(
        "--reference",
        default=DEFAULT_REFERENCE,
        help="the reference server's kinds to load beside the others, comma-separated: "
        f"threads (grpcio's threaded server), aio (grpc.aio) (default {DEFAULT_REFERENCE})",
    )
    parser.add_argument("--no-reference", action="store_true", help="no reference server")
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="Slipstream with --no-fsync (BuildGrid never syncs: durability like for like)",
    )
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else full
    load = Load(
        blobs=args.blobs or base.blobs,
        clients=args.clients or base.clients,
        duration=args.duration or base.duration,
        processes=min(args.client_processes or base.processes, args.clients or base.clients),
    )
    if load.blobs < 1 or load.clients < 1 or load.duration <= 0 or load.processes < 1:
        parser.error("--blobs, --clients, --duration and --client-processes must be positive")
    rounds = args.rounds or (1 if args.smoke else 2)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        rates = parse_rates(args.rate)
    except ValueError as e:
        parser.error(str(e))
    if args.no_buildgrid and any(r.endswith("x") for r in rates):
        parser.error("--rate Nx needs BuildGrid's throughput: not with --no-buildgrid")
    try:
        references = () if args.no_reference else parse_references(args.reference)
    except ValueError as e:
        parser.error(str(e))
    actions = max(1, load.blobs // 100)
    results: dict[str, Any] = {
        "rounds": rounds,
        "machine": machine(),
        "load": asdict(load),
        "actions": actions,
        "slipstream_fsync": not args.no_fsync,
        "slipstream_workers": args.workers,
        "rates": list(rates),
        "references": list(references),
    }
    bgd = None
    if args.no_buildgrid:
        results["buildgrid_unavailable"] = "--no-buildgrid"
    else:
        try:
            bgd, results["buildgrid_version"] = ensure_buildgrid(args.buildgrid_venv)
        except PeerUnavailable as e:
            results["buildgrid_unavailable"] = str(e)
            print(f"BuildGrid unavailable, measuring Slipstream only: {e}", file=sys.stderr)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="slipstream-fleet-", dir=args.storage_dir))
    try:
        phases = measure(
            workdir,
            load,
            rounds,
            actions,
            bgd,
            not args.no_fsync,
            results,
            args.workers,
            rates,
            references,
        )
        report(phases, results, args.json)
    except BaseException:
        traceback.print_exc()  # now: removing the stores may take minutes
        raise
    finally:
        # After the report: two million files take minutes to remove on a busy disk.
        print(f"removing {workdir} ...", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
