"""Slipstream beside BuildGrid: the cache workload of bench_cache against both, in one run.

    python -m benchmarks.bench_peers [--smoke] [--kinds memory,disk,s3] [--rounds N]
                                     [--json PATH] [--storage-dir DIR] [--buildgrid-venv DIR]

Sets up BuildGrid (PyPI `buildgrid` 0.9.x, which needs Python 3.13) in its own venv
(default ~/.cache/slipstream-bench/buildgrid-venv, reused when present), starts it with a
cache-only config (CAS, ActionCache, ByteStream, Capabilities) on a free 127.0.0.1 port,
and runs bench_cache's workload against Slipstream and BuildGrid, each with a fresh
store of the same kind, both running at once and measured in turns: every operation runs
--rounds times on each (the order flipping every round) and each figure is the median, so
both meet the same machine noise. The memory kind also measures benchmarks.reference_server
(a RAM-only Python server doing no checks): the most any Python server could show here.

  memory  both in-memory LRU stores, bounded at 4 GiB (Slipstream: --storage memory://)
  disk    both disk stores under --storage-dir (default /dev/shm, a tmpfs: steadier
          figures than a shared disk; the table says which filesystem it was)
  s3      both on the same local moto server (smaller sizes: moto answers one S3
          request at a time, so it sets the pace for both)

Prints each row for both servers and the Slipstream/BuildGrid ratio (rates: higher is
better for Slipstream; latencies: BuildGrid's over Slipstream's, so again higher is
better), and the SHA-256 one-core rate measured in the same run beside Slipstream's
ByteStream rates. Targets (issue 8): >= 2x BuildGrid on every row of the same storage kind;
ByteStream within 2x of SHA-256 alone. If BuildGrid cannot be set up, the reason is
printed and stored in the JSON, and only Slipstream's side runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import glob
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import grpc

from benchmarks.bench_cache import (
    SMOKE,
    Row,
    Sizes,
    Workload,
    default_storage_dir,
    machine,
    median_row,
    sha256_rate,
)
from benchmarks.bench_split_peers import cache_dir
from slipstream.cache_server.storage.disk import filesystem_type
from tests.support.moto import AWS_ENV, make_buckets, moto_client, moto_server
from tests.support.server_process import ServerProcess, free_port

HERE = pathlib.Path(__file__).parent
KINDS = ("memory", "disk", "s3")
MEMORY_BOUND = "4096M"  # both memory stores' size bound
BUILDGRID_REQUIREMENT = "buildgrid>=0.9,<0.10"
# moto serves one request at a time: S3 rows use fewer, smaller operations.
S3_SIZES = Sizes(small_blobs=1000, find_calls=2, stream_mib=64, clients=4, mixed_ops=25)


class PeerUnavailable(RuntimeError):
    """The peer could not be set up or started; the message says exactly why."""


def find_python313() -> str | None:
    """BuildGrid 0.9 needs Python 3.13: $SLIPSTREAM_BENCH_PYTHON313, PATH, then pyenv's
    versions. The first that runs as 3.13 wins: pyenv's shim for python3.13 is on PATH
    even where no pyenv setting selects 3.13, and then it only says "command not found"."""
    candidates = [os.environ.get("SLIPSTREAM_BENCH_PYTHON313"), shutil.which("python3.13")]
    pyenv = os.environ.get("PYENV_ROOT") or str(pathlib.Path.home() / ".pyenv")
    candidates += sorted(glob.glob(f"{pyenv}/versions/3.13.*/bin/python3"), reverse=True)
    return next((c for c in candidates if c and _is_python313(c)), None)


def _is_python313(python: str) -> bool:
    if not os.access(python, os.X_OK):
        return False
    try:
        proc = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[:2] == (3, 13))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.stdout.strip() == "True"


def _installed_version(venv: pathlib.Path) -> str | None:
    python = venv / "bin" / "python"
    if not (python.exists() and (venv / "bin" / "bgd").exists()):
        return None
    proc = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('buildgrid'))"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_buildgrid(venv: pathlib.Path, python: str | None = None) -> tuple[pathlib.Path, str]:
    """The bgd executable and BuildGrid's version; creates the venv unless it holds 0.9.x."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another benchmark run may be installing it
        version = _installed_version(venv)
        if version is None or not version.startswith("0.9."):
            python = python or find_python313()
            if python is None:
                raise PeerUnavailable(
                    "BuildGrid 0.9 needs Python 3.13 and none was found "
                    "(set SLIPSTREAM_BENCH_PYTHON313, or put python3.13 on PATH)"
                )
            print(f"setting up BuildGrid in {venv} with {python} ...", flush=True)
            started = time.perf_counter()
            shutil.rmtree(venv, ignore_errors=True)
            for cmd in (
                [python, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", BUILDGRID_REQUIREMENT],
            ):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise PeerUnavailable(
                        f"`{' '.join(cmd)}` failed ({proc.returncode}):\n"
                        + (proc.stderr or proc.stdout)[-3000:]
                    )
            version = _installed_version(venv)
            if version is None:
                raise PeerUnavailable(f"pip installed {BUILDGRID_REQUIREMENT} but no bgd in {venv}")
            print(f"BuildGrid {version} set up in {time.perf_counter() - started:.0f}s", flush=True)
    return venv / "bin" / "bgd", version


@dataclass
class S3:
    endpoint: str
    slipstream_bucket: str
    buildgrid_bucket: str


def s3_endpoint_rates(
    endpoint: str, bucket: str, sizes: Sizes, threads: int = 16
) -> dict[str, float]:
    """Objects/s the S3 endpoint itself takes and gives, with no cache server in front:
    `sizes.small_blobs` objects of `sizes.small_size` bytes PUT, then GET, by boto3 from
    `threads` threads. No server whose batches become one S3 request per blob can beat it."""
    client = moto_client(endpoint, threads)
    blobs = [os.urandom(sizes.small_size) for _ in range(sizes.small_blobs)]
    keys = [f"endpoint-alone/{i}" for i in range(len(blobs))]

    def put(i: int) -> None:
        client.put_object(Bucket=bucket, Key=keys[i], Body=blobs[i])

    def get(i: int) -> None:
        assert client.get_object(Bucket=bucket, Key=keys[i])["Body"].read() == blobs[i]

    rates = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for name, op in (("PUT", put), ("GET", get)):
            start = time.perf_counter()
            list(pool.map(op, range(len(blobs))))
            rates[name] = len(blobs) / (time.perf_counter() - start)
    return rates


def buildgrid_config(address: str, kind: str, store: pathlib.Path, s3: S3 | None) -> str:
    """A cache-only BuildGrid config: CAS, ByteStream, ActionCache (Capabilities comes
    with them), instance name "", no auth. BuildGrid's default pool (5 threads per CPU,
    and as many concurrent RPCs) rejects the mixed load's bursts with RESOURCE_EXHAUSTED
    ("Concurrent RPC limit exceeded") on 2 CPUs, so it gets 16 threads and queues up to
    256 RPCs instead."""
    if kind == "memory":
        storage = f"  - !lru-storage &cas\n    size: {MEMORY_BOUND}\n"
    elif kind == "disk":
        storage = f"  - !disk-storage &cas\n    path: {store}\n"
    else:
        assert s3 is not None
        s3_access = (
            f"    bucket: {s3.buildgrid_bucket}\n"
            f"    endpoint: {s3.endpoint}\n"
            f"    access-key: {AWS_ENV['AWS_ACCESS_KEY_ID']}\n"
            f"    secret-key: {AWS_ENV['AWS_SECRET_ACCESS_KEY']}\n"
        )
        storage = "  - !s3-storage &cas\n" + s3_access
    if s3 is None:
        action_cache = "  - !lru-action-cache &ac\n    max-cached-refs: 1000000\n"
    else:
        # Like Slipstream's, its action cache is kept in the bucket, under keys of its
        # own ("ac_<hash>_<size>") beside the CAS's "<hash>_<size>".
        action_cache = "  - !s3action-cache &ac\n    cache-key-salt: ac\n" + s3_access
    return f"""\
server:
  - !channel
    address: "{address}"
    insecure-mode: true
authorization:
  method: none
storages:
{storage}caches:
{action_cache}    storage: *cas
    allow-updates: true
instances:
  - name: ""
    services:
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
      - !action-cache
        cache: *ac
thread-pool-size: 16
maximum-concurrent-rpcs: 256
"""


@contextlib.contextmanager
def buildgrid_server(
    bgd: pathlib.Path, kind: str, workdir: pathlib.Path, s3: S3 | None
) -> Iterator[str]:
    """Start `bgd server start` on a free loopback port; yields its address."""
    address = f"127.0.0.1:{free_port()}"
    store = workdir / "buildgrid-cas"
    store.mkdir(parents=True, exist_ok=True)
    config = workdir / "buildgrid.yml"
    config.write_text(buildgrid_config(address, kind, store, s3))
    log = workdir / "buildgrid.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(AWS_ENV)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(bgd), "server", "start", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    try:
        deadline = time.monotonic() + 120
        with grpc.insecure_channel(address) as channel:
            ready = grpc.channel_ready_future(channel)
            while True:
                try:
                    ready.result(timeout=0.5)
                    break
                except grpc.FutureTimeoutError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise PeerUnavailable(
                            f"BuildGrid did not start (exit {proc.poll()}):\n"
                            + log.read_text()[-3000:]
                        ) from None
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def slipstream_server(kind: str, workdir: pathlib.Path, s3: S3 | None) -> Iterator[str]:
    """Start `slipstream serve` on a store of this kind (disk: in workdir)."""
    if kind == "memory":
        server = ServerProcess("memory://", ["--max-size", MEMORY_BOUND])
    elif kind == "s3":
        assert s3 is not None
        server = ServerProcess(f"s3://{s3.slipstream_bucket}", ["--s3-endpoint", s3.endpoint])
    else:
        server = ServerProcess(workdir / "slipstream-store")
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)  # the server process inherits the dummy credentials
    try:
        server.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield server.address
    finally:
        try:
            server.stop()
        except subprocess.TimeoutExpired:
            server.kill()


def slipstream_s3_works() -> str | None:
    """None if `slipstream serve --storage s3://...` exists here, else why not."""
    try:
        import slipstream.cache_server.storage.s3  # noqa: F401
    except ImportError as e:
        return f"Slipstream's S3 backend is not importable: {e}"
    return None


@contextlib.contextmanager
def reference_process(aio: bool = False) -> Iterator[tuple[str, int]]:
    """benchmarks.reference_server in its own process (on grpc.aio if aio); yields its
    address and pid."""
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "benchmarks.reference_server", "--port", address.split(":")[1]]
    proc = subprocess.Popen(
        [*cmd, "--aio"] if aio else cmd, stdout=subprocess.DEVNULL, cwd=HERE.parent
    )
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield address, proc.pid
    finally:
        proc.terminate()
        proc.wait(20)


@contextlib.contextmanager
def reference_server() -> Iterator[str]:
    """benchmarks.reference_server in its own process; yields its address."""
    with reference_process() as (address, _):
        yield address


def run_side_by_side(servers: dict[str, str], sizes: Sizes, rounds: int) -> dict[str, list[Row]]:
    """The workload against every server, interleaved: each operation runs `rounds` times
    on each server in turn (the order flipping every round), so all of them meet the same
    machine noise; each server's row is the median of its rounds."""
    workloads = {name: Workload(address, sizes) for name, address in servers.items()}
    try:
        operations = {name: w.operations() for name, w in workloads.items()}
        names = list(servers)
        results: dict[str, list[list[Row]]] = {n: [[] for _ in operations[n]] for n in names}
        for i in range(len(operations[names[0]])):
            for r in range(rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    results[name][i].append(operations[name][i]())
        return {name: [median_row(rows) for rows in results[name]] for name in names}
    finally:
        for w in workloads.values():
            w.close()


@dataclass
class Pair:
    kind: str
    operation: str
    unit: str
    slipstream: float
    buildgrid: float | None
    ratio: float | None  # > 1: Slipstream better (rates S/B; latencies B/S)
    better: str  # "higher" for rates, "lower" for latencies
    reference: float | None = None  # the reference server (benchmarks.reference_server)
    reference_ratio: float | None = None  # reference over BuildGrid: what any server could show


def _ratio(a: float | None, b: float | None, better: str) -> float | None:
    if not a or not b:
        return None
    return a / b if better == "higher" else b / a


def _get(row: Row | None, field: str) -> float | None:
    value = getattr(row, field) if row is not None else None
    return float(value) if value is not None else None


def _pairs(
    kind: str, ours: list[Row], theirs: list[Row] | None, ref: list[Row] | None
) -> list[Pair]:
    pairs: list[Pair] = []
    for i, row in enumerate(ours):
        other = theirs[i] if theirs else None
        top = ref[i] if ref else None
        values: list[tuple[str, str, str, float | None, float | None, float | None]] = [
            (row.name, row.unit, "higher", row.rate, _get(other, "rate"), _get(top, "rate"))
        ]
        if row.p50_ms is not None:
            for label in ("p50", "p99"):
                field = f"{label}_ms"
                values.append(
                    (f"  {label} latency", "ms", "lower", _get(row, field), _get(other, field),
                     _get(top, field))
                )  # fmt: skip
        for name, unit, better, a, b, c in values:
            assert a is not None
            pairs.append(
                Pair(kind, name, unit, a, b, _ratio(a, b, better), better, c, _ratio(c, b, better))
            )
    return pairs


def run_kind(
    kind: str,
    sizes: Sizes,
    rounds: int,
    storage_dir: pathlib.Path | None,
    bgd: pathlib.Path | None,
    s3_endpoint: str | None,
    reference: bool,
) -> dict[str, object]:
    """Slipstream and BuildGrid (and, for memory, the reference server), each on a fresh
    store of this kind, all running at once and measured in turns."""
    s3 = None
    if kind == "s3":
        assert s3_endpoint is not None
        suffix = f"{os.getpid()}-{time.monotonic_ns()}"
        s3 = S3(s3_endpoint, f"slipstream-{suffix}", f"buildgrid-{suffix}")
        make_buckets(s3_endpoint, s3.slipstream_bucket, s3.buildgrid_bucket)
    result: dict[str, object] = {"kind": kind, "sizes": asdict(sizes), "rounds": rounds}
    with contextlib.ExitStack() as stack:
        tmp = pathlib.Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(dir=storage_dir, prefix="slipstream-bench-")
            )
        )
        fs = filesystem_type(tmp)
        servers = {"slipstream": stack.enter_context(slipstream_server(kind, tmp / "ours", s3))}
        result["slipstream_store"] = {
            "memory": f"in-memory LRU (memory://, up to {MEMORY_BOUND})",
            "disk": f"disk on {fs} ({storage_dir})",
            "s3": "s3 (moto)",
        }[kind]
        if bgd is not None:
            servers["buildgrid"] = stack.enter_context(buildgrid_server(bgd, kind, tmp / "bg", s3))
            result["buildgrid_store"] = {
                "memory": "in-memory LRU (!lru-storage)",
                "disk": f"disk on {fs} ({storage_dir})",
                "s3": "s3 (moto), action cache in the bucket (!s3action-cache)",
            }[kind]
        if reference and kind == "memory":
            servers["reference"] = stack.enter_context(reference_server())
        print(f"[{kind}] {', '.join(servers)}: {rounds} rounds, interleaved ...", flush=True)
        rows = run_side_by_side(servers, sizes, rounds)
        if s3 is not None:
            result["s3_endpoint_alone"] = s3_endpoint_rates(
                s3.endpoint, s3.slipstream_bucket, sizes
            )
    ours, theirs, ref = rows["slipstream"], rows.get("buildgrid"), rows.get("reference")
    result["slipstream"] = [{**asdict(r), "rate": r.rate} for r in ours]
    result["buildgrid"] = [{**asdict(r), "rate": r.rate} for r in theirs] if theirs else None
    result["reference"] = [{**asdict(r), "rate": r.rate} for r in ref] if ref else None
    result["pairs"] = [asdict(p) for p in _pairs(kind, ours, theirs, ref)]
    return result


def print_table(results: dict[str, object]) -> None:
    sha = results["sha256_mib_s"]
    assert isinstance(sha, float)
    print()
    print(
        f"{'storage':<8} {'operation':<34} {'Slipstream':>12} {'BuildGrid':>12} {'S/B':>7}"
        f" {'reference':>12} {'R/B':>7}  unit"
    )

    def cell(value: float | None, width: int, ratio: bool = False) -> str:
        if value is None:
            return f"{'-':>{width}}"
        return f"{value:>{width - 1}.2f}x" if ratio else f"{value:>{width},.1f}"

    for run in results["runs"]:  # type: ignore[attr-defined]
        for p in run["pairs"]:
            print(
                f"{p['kind']:<8} {p['operation']:<34} {p['slipstream']:>12,.1f} "
                f"{cell(p['buildgrid'], 12)} {cell(p['ratio'], 7, True)} "
                f"{cell(p['reference'], 12)} {cell(p['reference_ratio'], 7, True)}  {p['unit']}"
            )
    print(f"\nSHA-256 on one core, this run: {sha:,.1f} MiB/s")
    for run in results["runs"]:  # type: ignore[attr-defined]
        for p in run["pairs"]:
            if p["operation"].startswith("ByteStream"):
                print(
                    f"  {run['kind']:<7} Slipstream {p['operation']}: {p['slipstream']:,.1f} MiB/s "
                    f"= SHA-256 / {sha / p['slipstream']:.2f} (target: within 2x)"
                )
    for run in results["runs"]:  # type: ignore[attr-defined]
        if alone := run.get("s3_endpoint_alone"):
            print(
                f"S3 endpoint alone (boto3, 16 threads, {run['sizes']['small_size'] // 1024} KiB "
                f"objects, no server in front): PUT {alone['PUT']:,.1f}/s, "
                f"GET {alone['GET']:,.1f}/s"
            )
    print("S/B: Slipstream over BuildGrid for rates, BuildGrid over Slipstream for latencies;")
    print("above 1 means Slipstream is better, the target is 2x on every row. Each figure is")
    print("the median of the rounds (servers measured in turns). reference: a RAM-only server")
    print("doing no checks (benchmarks/reference_server.py); R/B is the most any Python server")
    print("could show against BuildGrid on this machine and client.")
    for run in results["runs"]:  # type: ignore[attr-defined]
        print(
            f"  {run['kind']}: Slipstream {run['slipstream_store']}; "
            f"BuildGrid {run.get('buildgrid_store', '-')}"
        )
    if results.get("buildgrid_unavailable"):
        print(f"BuildGrid not measured: {results['buildgrid_unavailable']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it runs")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="storage kinds, from memory,disk,s3 (default all)"
    )
    parser.add_argument(
        "--json", type=pathlib.Path, default=HERE / "peers_results.json", help="results file"
    )
    parser.add_argument(
        "--storage-dir",
        type=pathlib.Path,
        default=default_storage_dir(),
        help="where both disk stores go (default /dev/shm, a tmpfs)",
    )
    parser.add_argument(
        "--buildgrid-venv",
        type=pathlib.Path,
        default=cache_dir() / "buildgrid-venv",
        help="BuildGrid's venv, created if missing (default ~/.cache/slipstream-bench/...)",
    )
    parser.add_argument("--buildgrid-python", help="a Python 3.13 for BuildGrid's venv")
    parser.add_argument(
        "--no-buildgrid", action="store_true", help="measure Slipstream's side only"
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds of each operation per server (default 3; smoke 1)"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="leave out the reference server"
    )
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the servers started here are stopped too.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown storage kinds: {sorted(unknown)}")
    # Every round stores new blobs; the footprint stays well under the ~2 GB of fresh
    # memory after which this VM's writes slow tenfold (see benchmarks/README.md).
    sizes = SMOKE if args.smoke else Sizes(small_blobs=10_000)
    s3_sizes = SMOKE if args.smoke else S3_SIZES
    rounds = args.rounds or (1 if args.smoke else 3)
    if rounds < 1:
        parser.error("--rounds must be at least 1")

    results: dict[str, object] = {"machine": machine(), "smoke": args.smoke, "runs": []}
    bgd = None
    if args.no_buildgrid:
        results["buildgrid_unavailable"] = "--no-buildgrid"
    else:
        try:
            bgd, version = ensure_buildgrid(args.buildgrid_venv, args.buildgrid_python)
            results["buildgrid_version"] = version
        except PeerUnavailable as e:
            results["buildgrid_unavailable"] = str(e)
            print(f"BuildGrid unavailable, measuring Slipstream only: {e}", file=sys.stderr)
    if "s3" in kinds and (why := slipstream_s3_works()):
        print(f"skipping s3: {why}", file=sys.stderr)
        results["s3_skipped"] = why
        kinds.remove("s3")

    results["sha256_mib_s"] = statistics.median(
        sha256_rate(sizes.stream_mib).rate for _ in range(rounds)
    )
    runs: list[dict[str, object]] = []
    with contextlib.ExitStack() as stack:
        s3_endpoint = stack.enter_context(moto_server()) if "s3" in kinds else None
        for kind in kinds:
            try:
                run = run_kind(
                    kind,
                    s3_sizes if kind == "s3" else sizes,
                    rounds,
                    args.storage_dir,
                    bgd,
                    s3_endpoint,
                    not args.no_reference,
                )
            except PeerUnavailable as e:
                print(f"[{kind}] {e}", file=sys.stderr)
                results.setdefault("errors", {})[kind] = str(e)  # type: ignore[index]
                continue
            runs.append(run)
    results["runs"] = runs
    results["storage_dir"] = str(args.storage_dir)
    results["storage_fs"] = filesystem_type(args.storage_dir or pathlib.Path(tempfile.gettempdir()))
    print_table(results)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
