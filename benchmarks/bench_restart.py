"""Restart at scale: how soon `slipstream serve` answers on a disk store of N blobs.

    python -m benchmarks.bench_restart [--blobs N] [--starts K] [--smoke] [--json PATH]
                                       [--storage-dir DIR] [--cold] [--workers N]

Fills a disk store under --storage-dir with N small blobs (64-1,024 bytes) and N/100
action results (benchmarks/fleet_store.py, through the store's own code), then starts
`python -m slipstream.cli serve` on it K times and measures, from the moment the process
is started:
  - the first FindMissingBlobs answer (one present blob, one absent) that is right,
  - the first GetActionResult hit (its outputs checked by the server),
  - the server's RSS then (from /proc),
  - when its index is loaded (the server serves while it loads: /metrics says
    slipstream_store_index_loading 1 and has no store figures until then), and the
    server's RSS and CPU then,
  - its store statistics (Prometheus /metrics) once loaded, which must be exactly the
    blobs the fill wrote and the records on disk (the fill's action results and the
    server's own: each server process saves its figures for the pages as a record when
    it stops).
Target (issue 23): a million blobs ready to serve within 10 s.

--storage-dir defaults to the system's temp dir (a real disk here): a million small files
on a tmpfs would hold ~4 GB of RAM. The directory entries and inodes are in the kernel's
caches after the fill (a warm restart, as when a server process restarts on its machine);
--cold empties those caches before each start (as after the machine's reboot: it writes
/proc/sys/vm/drop_caches, so it needs root, and slows every process on the machine for a
moment). --workers N starts `serve --workers N` (the supervisor loads the index).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass

import grpc

from benchmarks.bench_cache import machine
from benchmarks.fleet_store import Filled, action_digest, blob_digest, fill_slipstream
from slipstream.cache_server.storage.disk import filesystem_type
from slipstream.cache_server.storage.disk_index import block_size_of, space_taken
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc
from tests.support.proc_stats import cpu_seconds, rss_bytes
from tests.support.server_process import free_port

FULL_BLOBS = 1_000_000
SMOKE_BLOBS = 1_000
TARGET_SECONDS = 10.0
DROP_CACHES = "/proc/sys/vm/drop_caches"
SEED = 1
_METRIC = re.compile(r"^(slipstream_store_(?:blobs|bytes)) (\S+)$", re.MULTILINE)


@dataclass
class Start:
    """One start of the server on the filled store."""

    find_seconds: float  # process start to the first right FindMissingBlobs answer
    action_seconds: float  # to the first GetActionResult hit
    rss_bytes: int  # the server's RSS at that moment
    cpu_seconds: float  # the CPU the server had used by then
    loaded_seconds: float  # to the index loaded (/metrics has the store's figures)
    loaded_rss_bytes: int  # the server's RSS then
    loaded_cpu_seconds: float  # and its CPU
    entries: int  # its store statistics, once loaded
    bytes: int
    exact: bool  # entries and bytes are the filled blobs' and the records' on disk


def _wait_for_answer(address: str, deadline: float, filled: Filled) -> tuple[float, float]:
    """Seconds (perf_counter) at which finds and then action-cache gets are answered right."""
    present = blob_digest(SEED, filled.blobs // 2)
    absent = re_pb2.Digest(hash="0" * 64, size_bytes=1)
    find = re_pb2.FindMissingBlobsRequest(blob_digests=[present, absent])
    get = re_pb2.GetActionResultRequest(action_digest=action_digest(SEED, filled.actions // 2))
    with grpc.insecure_channel(address) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        ac = re_grpc.ActionCacheStub(channel)
        while True:
            try:
                missing = cas.FindMissingBlobs(find, timeout=1, wait_for_ready=True)
                if list(missing.missing_blob_digests) == [absent]:
                    break
            except grpc.RpcError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError("the server gave no right FindMissingBlobs answer in time")
        found_at = time.perf_counter()
        while True:
            try:
                ac.GetActionResult(get, timeout=1, wait_for_ready=True)
                return found_at, time.perf_counter()
            except grpc.RpcError as e:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"no GetActionResult hit in time: {e.details()}") from e


def _store_stats(metrics_url: str, deadline: float) -> tuple[int, int]:
    """(entries, bytes) from the server's /metrics, once its index is loaded (until then
    /metrics leaves them out)."""
    while True:
        try:
            with urllib.request.urlopen(metrics_url, timeout=30) as response:
                text = response.read().decode()
            values = {m.group(1): float(m.group(2)) for m in _METRIC.finditer(text)}
            if len(values) == 2:
                return int(values["slipstream_store_blobs"]), int(values["slipstream_store_bytes"])
        except OSError:
            if time.perf_counter() > deadline:
                raise
        if time.perf_counter() > deadline:
            raise TimeoutError("the server's index did not load in time")
        time.sleep(0.05)


def _expected(root: pathlib.Path, filled: Filled) -> tuple[int, int]:
    """(entries, bytes) the store must count: the filled blobs (the load writes none),
    and every record file on disk, each with the space it takes."""
    block = block_size_of(root)
    records = [p for p in (root / "records").rglob("*") if p.is_file()]
    used = sum(space_taken(p.stat().st_size, block) for p in records)
    return filled.blobs + len(records), filled.blob_bytes + used


def drop_caches() -> None:
    """Write the dirty pages out and empty the kernel's page, dentry and inode caches."""
    subprocess.run(["sync"], check=True)
    pathlib.Path(DROP_CACHES).write_text("3\n")


def measure_start(
    root: pathlib.Path,
    filled: Filled,
    timeout: float = 300,
    *,
    cold: bool = False,
    workers: int = 1,
) -> Start:
    """Start `slipstream serve` on root (after drop_caches if cold), time its first
    answers, stop it."""
    expected = _expected(root, filled)
    address = f"127.0.0.1:{free_port()}"
    metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
    cmd = [
        sys.executable,
        "-m",
        "slipstream.cli",
        "serve",
        "--listen",
        address,
        "--storage",
        str(root),
        "--metrics-listen",
        metrics_url.removeprefix("http://").removesuffix("/metrics"),
        *(["--workers", str(workers)] if workers > 1 else []),
    ]
    if cold:
        drop_caches()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        found_at, got_at = _wait_for_answer(address, started + timeout, filled)
        rss, cpu = rss_bytes(proc.pid), cpu_seconds(proc.pid)
        entries, used = _store_stats(metrics_url, started + timeout)
        loaded_at = time.perf_counter()
        loaded_rss, loaded_cpu = rss_bytes(proc.pid), cpu_seconds(proc.pid)
    except BaseException:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        print(err[-3000:], file=sys.stderr)
        raise
    proc.terminate()
    proc.communicate(timeout=60)
    return Start(
        round(found_at - started, 3),
        round(got_at - started, 3),
        rss,
        cpu,
        round(loaded_at - started, 3),
        loaded_rss,
        loaded_cpu,
        entries,
        used,
        (entries, used) == expected,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_BLOBS:,} blobs, one start")
    parser.add_argument("--blobs", type=int, help=f"blobs in the store (default {FULL_BLOBS:,})")
    parser.add_argument("--starts", type=int, help="server starts to time (default 3; smoke 1)")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    parser.add_argument(
        "--storage-dir",
        type=pathlib.Path,
        help="where the store goes (default the system's temp dir)",
    )
    parser.add_argument(
        "--cold", action="store_true", help="empty the kernel's caches before each start (root)"
    )
    parser.add_argument("--workers", type=int, default=1, help="serve --workers N (default 1)")
    args = parser.parse_args(argv)
    blobs = args.blobs or (SMOKE_BLOBS if args.smoke else FULL_BLOBS)
    starts = args.starts or (1 if args.smoke else 3)
    if blobs < 1 or starts < 1 or args.workers < 1:
        parser.error("--blobs, --starts and --workers must be at least 1")
    if args.cold and not os.access(DROP_CACHES, os.W_OK):
        parser.error(f"--cold needs to write {DROP_CACHES} (as root)")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="slipstream-restart-", dir=args.storage_dir))
    try:
        root = workdir / "store"
        print(f"filling {root} with {blobs:,} blobs ...", flush=True)
        filled = fill_slipstream(root, blobs, max(1, blobs // 100), SEED)
        print(
            f"filled: {filled.entries:,} entries, {filled.bytes:,} bytes in "
            f"{filled.seconds:.1f}s ({filled.blobs / filled.seconds:,.0f} blobs/s)",
            flush=True,
        )
        runs = []
        for _ in range(starts):
            run = measure_start(root, filled, cold=args.cold, workers=args.workers)
            print(
                f"start: finds answered after {run.find_seconds:.2f}s, action results after "
                f"{run.action_seconds:.2f}s (RSS {run.rss_bytes / 2**20:,.0f} MiB, "
                f"CPU {run.cpu_seconds:.2f}s); index loaded after {run.loaded_seconds:.2f}s "
                f"(RSS {run.loaded_rss_bytes / 2**20:,.0f} MiB, CPU "
                f"{run.loaded_cpu_seconds:.2f}s): {run.entries:,} entries, {run.bytes:,} "
                f"bytes ({'exact' if run.exact else 'NOT EXACT'})",
                flush=True,
            )
            runs.append(run)
        fs = filesystem_type(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    median = statistics.median(r.find_seconds for r in runs)
    loaded = statistics.median(r.loaded_seconds for r in runs)
    verdict = "met" if median <= TARGET_SECONDS else "NOT met"
    print(
        f"\n{blobs:,} blobs on {fs}{' (cold)' if args.cold else ''}"
        f"{f', {args.workers} workers' if args.workers > 1 else ''}: ready to serve after "
        f"{median:.2f}s (median of {starts}); "
        f"target {TARGET_SECONDS:.0f}s {verdict}; index loaded after {loaded:.2f}s; "
        f"stats exact: {all(r.exact for r in runs)}"
    )
    if args.json:
        results = {
            "machine": machine(),
            "storage_dir": str(args.storage_dir or tempfile.gettempdir()),
            "filesystem": fs,
            "cold": args.cold,
            "workers": args.workers,
            "filled": asdict(filled),
            "starts": [asdict(r) for r in runs],
            "ready_seconds_median": median,
            "loaded_seconds_median": loaded,
            "target_seconds": TARGET_SECONDS,
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r.exact for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
