"""Cache server benchmark: the same REAPI workload against a running server.

    python -m benchmarks.bench_cache [--smoke] [--json results.json] [--storage-dir DIR]

Starts `slipstream serve` on the disk store (in a temp dir under --storage-dir;
/dev/shm gives steadier figures than a shared disk), then measures:
  - BatchUpdateBlobs of 4 KiB blobs (blobs/s)
  - FindMissingBlobs of 1,000 digests, half present (calls/s)
  - BatchReadBlobs of 4 KiB blobs (blobs/s)
  - one 64 MiB ByteStream write and read (MB/s)
  - a mixed load from several concurrent client processes (ops/s, p50/p99 latency)
  - SHA-256 on one core in this process (MB/s), the ceiling for a verifying write
The workload is a function of a server address, so peers can run the same one
(benchmarks/bench_peers.py runs it against BuildGrid in the same process run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import pathlib
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import grpc

from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import bytestream_pb2_grpc as bs_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc
from tests.support.reapi import write_requests
from tests.support.server_process import ServerProcess

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@dataclass(frozen=True)
class Sizes:
    small_blobs: int = 20_000
    small_size: int = 4096
    batch: int = 500
    find_calls: int = 50
    find_digests: int = 1000
    stream_mib: int = 64
    clients: int = 8  # concurrent client processes in the mixed load
    mixed_ops: int = 300  # operations per client


SMOKE = Sizes(
    small_blobs=200,
    batch=100,
    find_calls=3,
    find_digests=100,
    stream_mib=2,
    clients=2,
    mixed_ops=10,
)


@dataclass
class Row:
    name: str
    count: int
    seconds: float
    unit: str
    p50_ms: float | None = None  # per-operation latency, for the mixed load
    p99_ms: float | None = None
    rounds: list[float] | None = None  # each round's rate, when this is their median

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else float("inf")


def _digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sha256_rate(mib: int) -> Row:
    data = os.urandom(mib << 20)
    seconds = _timed(lambda: hashlib.sha256(data).digest())
    return Row("sha256 one core", mib, seconds, "MiB/s")


_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class Workload:
    """The REAPI workload against one server, one operation per method, each returning
    its Row. Operations may run again (rounds): every upload sends fresh blobs, and the
    reads read what the latest uploads stored."""

    def __init__(self, address: str, sizes: Sizes) -> None:
        self.address = address
        self.sizes = sizes
        self.channel = grpc.insecure_channel(address, options=_OPTIONS)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.bytestream = bs_grpc.ByteStreamStub(self.channel)
        self._batches: list[list[re_pb2.Digest]] = []  # stored by the latest upload
        self._big: re_pb2.Digest | None = None  # stored by the latest stream write

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def operations(self) -> list[Callable[[], Row]]:
        """In the order they must first run: reads need what the writes stored."""
        return [
            self.batch_update,
            self.find_missing,
            self.batch_read,
            self.stream_write,
            self.stream_read,
            self.mixed,
        ]

    def batch_update(self) -> Row:
        sizes = self.sizes
        blobs = [os.urandom(sizes.small_size) for _ in range(sizes.small_blobs)]
        digests = [_digest(b) for b in blobs]
        starts = range(0, len(blobs), sizes.batch)
        requests = [
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b)
                    for d, b in zip(
                        digests[i : i + sizes.batch], blobs[i : i + sizes.batch], strict=True
                    )
                ]
            )
            for i in starts
        ]

        def upload() -> None:
            for request in requests:
                self.cas.BatchUpdateBlobs(request)

        row = Row("BatchUpdateBlobs 4 KiB", len(blobs), _timed(upload), "blobs/s")
        self._batches = [digests[i : i + sizes.batch] for i in starts]
        return row

    def find_missing(self) -> Row:
        sizes = self.sizes
        present = [d for batch in self._batches for d in batch]
        half = sizes.find_digests // 2
        absent = [_digest(os.urandom(32)) for _ in range(sizes.find_digests - half)]
        request = re_pb2.FindMissingBlobsRequest(blob_digests=present[:half] + absent)

        def find() -> None:
            for _ in range(sizes.find_calls):
                resp = self.cas.FindMissingBlobs(request)
                assert len(resp.missing_blob_digests) == len(absent)

        name = f"FindMissingBlobs {sizes.find_digests} digests"
        return Row(name, sizes.find_calls, _timed(find), "calls/s")

    def batch_read(self) -> Row:
        requests = [re_pb2.BatchReadBlobsRequest(digests=batch) for batch in self._batches]

        def read() -> None:
            for request in requests:
                resp = self.cas.BatchReadBlobs(request)
                assert all(r.status.code == 0 for r in resp.responses)

        count = sum(map(len, self._batches))
        return Row("BatchReadBlobs 4 KiB", count, _timed(read), "blobs/s")

    def stream_write(self) -> Row:
        mib = self.sizes.stream_mib
        big = os.urandom(mib << 20)
        d = _digest(big)
        name = f"uploads/bench-{d.hash[:8]}/blobs/{d.hash}/{d.size_bytes}"
        requests = write_requests(name, big, 1 << 20)

        def write() -> None:
            assert self.bytestream.Write(iter(requests)).committed_size == len(big)

        row = Row(f"ByteStream write {mib} MiB", mib, _timed(write), "MiB/s")
        self._big = d
        return row

    def stream_read(self) -> Row:
        d = self._big
        assert d is not None, "stream_write first"
        req = bs_pb2.ReadRequest(resource_name=f"blobs/{d.hash}/{d.size_bytes}")

        def read() -> None:
            assert sum(len(r.data) for r in self.bytestream.Read(req)) == d.size_bytes

        mib = self.sizes.stream_mib
        return Row(f"ByteStream read {mib} MiB", mib, _timed(read), "MiB/s")

    def mixed(self) -> Row:
        return run_mixed(self.address, self.sizes)


def median_row(rows: list[Row]) -> Row:
    """One Row for several rounds of an operation: the median rate and latencies."""
    rate = statistics.median(r.rate for r in rows)
    first = rows[0]
    p50 = [r.p50_ms for r in rows if r.p50_ms is not None]
    p99 = [r.p99_ms for r in rows if r.p99_ms is not None]
    return Row(
        first.name,
        first.count,
        first.count / rate,
        first.unit,
        p50_ms=statistics.median(p50) if p50 else None,
        p99_ms=statistics.median(p99) if p99 else None,
        rounds=[round(r.rate, 3) for r in rows],
    )


def run_workload(address: str, sizes: Sizes, rounds: int = 1) -> list[Row]:
    """The REAPI workload against the server at address; one row per operation,
    each the median of `rounds` runs."""
    with Workload(address, sizes) as workload:
        results: list[list[Row]] = [[] for _ in workload.operations()]
        for _ in range(rounds):
            for i, operation in enumerate(workload.operations()):
                results[i].append(operation())
    return [median_row(rows) for rows in results]


# ---- the mixed load: several client processes at once ----

_MIX = (  # (operation, cumulative probability)
    ("find", 0.30),  # FindMissingBlobs of 100 digests, half present
    ("read", 0.50),  # BatchReadBlobs of 10 present 4 KiB blobs
    ("update", 0.70),  # BatchUpdateBlobs of 10 new 4 KiB blobs
    ("get_ac", 0.85),  # GetActionResult, a hit whose outputs the server may check
    ("update_ac", 0.90),  # UpdateActionResult
    ("stream", 1.00),  # ByteStream read of a 1 MiB blob
)
_Pool = tuple[list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]


def _action_result(outputs: list[re_pb2.Digest]) -> re_pb2.ActionResult:
    return re_pb2.ActionResult(
        exit_code=0,
        output_files=[re_pb2.OutputFile(path=f"out/{i}", digest=d) for i, d in enumerate(outputs)],
    )


def _setup_pool(address: str) -> _Pool:
    """Blobs and action results the mixed load reads: 1,000 small, 4 big, 100 results."""
    small = [os.urandom(4096) for _ in range(1000)]
    big = [os.urandom(1 << 20) for _ in range(4)]
    with grpc.insecure_channel(address, options=_OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        ac = re_grpc.ActionCacheStub(channel)
        for group in [small[i : i + 500] for i in range(0, len(small), 500)] + [[b] for b in big]:
            cas.BatchUpdateBlobs(
                re_pb2.BatchUpdateBlobsRequest(
                    requests=[
                        re_pb2.BatchUpdateBlobsRequest.Request(digest=_digest(b), data=b)
                        for b in group
                    ]
                )
            )
        digests = [_digest(b) for b in small]
        actions = []
        for i in range(100):
            key = _digest(os.urandom(64))
            outputs = digests[i * 10 : i * 10 + 3]
            ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    action_digest=key, action_result=_action_result(outputs)
                )
            )
            actions.append((key.hash, key.size_bytes))
    return (
        [(d.hash, d.size_bytes) for d in digests],
        [(d.hash, d.size_bytes) for d in map(_digest, big)],
        actions,
    )


def _mixed_client(
    address: str,
    seed: int,
    ops: int,
    pool: _Pool,
    barrier: Any,
    results: Any,
) -> None:
    """One client process: prepare, wait for the others, then time each operation."""
    rng = random.Random(seed)
    small, big, actions = ([re_pb2.Digest(hash=h, size_bytes=n) for h, n in p] for p in pool)
    plan: list[tuple[str, Any]] = []
    for _ in range(ops):
        r = rng.random()
        op = next(name for name, p in _MIX if r < p)
        if op == "find":
            present = rng.sample(small, 50)
            arg: Any = present + [_digest(os.urandom(32)) for _ in range(50)]
        elif op == "read":
            arg = rng.sample(small, 10)
        elif op == "update":
            arg = [os.urandom(4096) for _ in range(10)]
        elif op == "get_ac":
            arg = rng.choice(actions)
        elif op == "update_ac":
            arg = (_digest(os.urandom(64)), _action_result(rng.sample(small, 3)))
        else:
            arg = rng.choice(big)
        plan.append((op, arg))
    try:
        results.put(_run_plan(address, plan, barrier))
    except BaseException as e:
        results.put(f"client {seed}: {e!r}")
        raise


def _run_plan(address: str, plan: list[tuple[str, Any]], barrier: Any) -> list[float]:
    latencies: list[float] = []
    with grpc.insecure_channel(address, options=_OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        ac = re_grpc.ActionCacheStub(channel)
        bytestream = bs_grpc.ByteStreamStub(channel)
        re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())
        barrier.wait()
        for op, arg in plan:
            start = time.perf_counter()
            if op == "find":
                cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=arg))
            elif op == "read":
                resp = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=arg))
                assert all(r.status.code == 0 for r in resp.responses)
            elif op == "update":
                blobs: list[bytes] = arg
                cas.BatchUpdateBlobs(
                    re_pb2.BatchUpdateBlobsRequest(
                        requests=[
                            re_pb2.BatchUpdateBlobsRequest.Request(digest=_digest(b), data=b)
                            for b in blobs
                        ]
                    )
                )
            elif op == "get_ac":
                ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=arg))
            elif op == "update_ac":
                key, result = arg
                ac.UpdateActionResult(
                    re_pb2.UpdateActionResultRequest(action_digest=key, action_result=result)
                )
            else:
                d: re_pb2.Digest = arg
                req = bs_pb2.ReadRequest(resource_name=f"blobs/{d.hash}/{d.size_bytes}")
                assert sum(len(r.data) for r in bytestream.Read(req)) == d.size_bytes
            latencies.append(time.perf_counter() - start)
    return latencies


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def run_mixed(address: str, sizes: Sizes) -> Row:
    """Clients (separate processes, so the client side is not one GIL) run a mix of
    find/read/update/action-cache/ByteStream calls at once; ops/s and p50/p99 latency."""
    pool = _setup_pool(address)
    ctx = multiprocessing.get_context("spawn")  # grpc does not survive fork
    barrier = ctx.Barrier(sizes.clients + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_mixed_client,
            args=(address, seed, sizes.mixed_ops, pool, barrier, results),
            daemon=True,
        )
        for seed in range(sizes.clients)
    ]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=300)
        start = time.perf_counter()
        latencies = []
        for _ in procs:
            got = results.get(timeout=900)
            if isinstance(got, str):
                raise RuntimeError(f"mixed load failed: {got}")
            latencies += got
        seconds = time.perf_counter() - start
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert statistics.fmean(latencies) > 0
    return Row(
        f"mixed load, {sizes.clients} clients",
        len(latencies),
        seconds,
        "ops/s",
        p50_ms=round(_percentile(latencies, 50) * 1000, 3),
        p99_ms=round(_percentile(latencies, 99) * 1000, 3),
    )


RAM_DIRECTORY = pathlib.Path("/dev/shm")


def default_storage_dir() -> pathlib.Path | None:
    """The benchmarks' --storage-dir default: /dev/shm (a tmpfs, whose figures are steadier
    than a shared disk's) if it is a directory here, else None (the system's temp dir)."""
    return RAM_DIRECTORY if RAM_DIRECTORY.is_dir() else None


def machine() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def server_benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark of one server shares: --smoke, --json, --storage-dir."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, to check the benchmark runs"
    )
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    parser.add_argument(
        "--storage-dir",
        type=pathlib.Path,
        default=default_storage_dir(),
        help="where the server's store goes (default /dev/shm, a tmpfs)",
    )
    return parser


def print_rows(rows: list[Row]) -> None:
    """The rows as a table, with latencies where a row has them."""
    print(f"{'operation':<36} {'rate':>14}  unit")
    for row in rows:
        latency = f"  p50 {row.p50_ms} ms, p99 {row.p99_ms} ms" if row.p50_ms is not None else ""
        print(f"{row.name:<36} {row.rate:>14,.1f}  {row.unit}{latency}")


def report(args: argparse.Namespace, sizes: DataclassInstance, rows: list[Row]) -> None:
    """Print the rows, and write them to --json with the machine and sizes if asked."""
    print_rows(rows)
    if args.json:
        results = {
            "machine": machine(),
            "storage_dir": str(args.storage_dir),
            "sizes": asdict(sizes),
            "rows": [{**asdict(r), "rate": r.rate} for r in rows],
        }
        args.json.write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = server_benchmark_parser(__doc__)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    rows = [sha256_rate(sizes.stream_mib)]
    with tempfile.TemporaryDirectory(dir=args.storage_dir) as tmp:
        server = ServerProcess(pathlib.Path(tmp) / "store").start()
        try:
            rows += run_workload(server.address, sizes)
        finally:
            server.stop()
    report(args, sizes, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
