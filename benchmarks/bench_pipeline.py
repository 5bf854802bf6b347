"""A small simulated CI pipeline: where the 10 / 20 / 45 minute targets stand.

    python -m benchmarks.bench_pipeline [--smoke] [--history RUN1.xml --later RUN2.xml]
                                        [--scale X] [--shards 1,2,4,8,16,32] [--json PATH]

Two stages, one after the other, as a CI pipeline runs them:

build  a synthetic action graph (--actions, compute times lognormal around
       --action-seconds, outputs lognormal around --output-kib) against a real
       `slipstream serve` (disk store under --storage-dir, default /dev/shm). Cold: every
       action misses (GetActionResult), "runs" (its compute time is added, not slept,
       spread over --build-cores by LPT), uploads its outputs and its action result.
       Warm: the same actions again: every one hits and its outputs are downloaded. The
       cache traffic is real and timed, from --build-cores concurrent client threads.
tests  the history's tests split by Slipstream over N runners (estimates from --history),
       each shard judged on the --later run's real durations (times --scale, to model a
       bigger suite from a real one), plus each shard's pytest start-up and collection
       (the recorded unsplit runs' wall time minus their test time).

Every job (the build, each test shard) also pays --runner-overhead (boot, checkout).
Prints, per N, the pipeline's wall time with a cold and a warm cache and which targets
(--targets, minutes) each meets, and the smallest N that meets each target.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import pathlib
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import grpc

from benchmarks.bench_cache import default_storage_dir, machine
from benchmarks.bench_split_peers import read_run
from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import bytestream_pb2_grpc as bs_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc
from slipstream.splitter import history
from slipstream.splitter.algorithm import split_tests
from tests.support.server_process import ServerProcess

HERE = pathlib.Path(__file__).parent
DATA = HERE / "data"
BATCH_LIMIT = 1 << 20  # outputs above this go through ByteStream
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


@dataclass
class Action:
    key: re_pb2.Digest
    compute_s: float
    outputs: list[bytes]


def make_actions(count: int, mean_s: float, output_kib: float, seed: int) -> list[Action]:
    """Heavy-tailed compute times and output sizes (lognormal, sigma 1)."""
    rng = random.Random(seed)
    mu = -0.5  # lognormvariate(mu, 1) has mean e^(mu + 1/2) = 1
    actions = []
    for i in range(count):
        outputs = [
            rng.randbytes(max(1, int(output_kib * 1024 * rng.lognormvariate(mu, 1.0))))
            for _ in range(rng.randint(1, 3))
        ]
        key_bytes = f"action {seed} {i}".encode()
        key = re_pb2.Digest(hash=hashlib.sha256(key_bytes).hexdigest(), size_bytes=len(key_bytes))
        actions.append(Action(key, mean_s * rng.lognormvariate(mu, 1.0), outputs))
    return actions


def _digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def lpt_makespan(times: list[float], workers: int) -> float:
    heap = [0.0] * workers
    for t in sorted(times, reverse=True):
        heapq.heappush(heap, heapq.heappop(heap) + t)
    return max(heap)


@dataclass
class BuildResult:
    cache: str  # "cold" or "warm"
    hits: int
    misses: int
    compute_seconds: float  # simulated: LPT makespan of the missed actions' compute
    cache_seconds: float  # measured: the cache traffic's wall time
    bytes_moved: int

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.cache_seconds


def build(address: str, actions: list[Action], cores: int, cache: str) -> BuildResult:
    """Run every action through the cache: a hit downloads, a miss uploads."""
    channel = grpc.insecure_channel(address, options=_OPTIONS)
    cas = re_grpc.ContentAddressableStorageStub(channel)
    ac = re_grpc.ActionCacheStub(channel)
    bytestream = bs_grpc.ByteStreamStub(channel)

    def one(action: Action) -> tuple[bool, int]:
        try:
            result = ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.key))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
        else:
            moved = 0
            small = [f.digest for f in result.output_files if f.digest.size_bytes <= BATCH_LIMIT]
            if small:
                got = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=small))
                moved += sum(len(r.data) for r in got.responses)
            for f in result.output_files:
                if f.digest.size_bytes > BATCH_LIMIT:
                    name = f"blobs/{f.digest.hash}/{f.digest.size_bytes}"
                    req = bs_pb2.ReadRequest(resource_name=name)
                    moved += sum(len(r.data) for r in bytestream.Read(req))
            return True, moved
        digests = [_digest(o) for o in action.outputs]
        missing = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests))
        absent = {d.hash for d in missing.missing_blob_digests}
        batch = [
            re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=o)
            for d, o in zip(digests, action.outputs, strict=True)
            if d.hash in absent and len(o) <= BATCH_LIMIT
        ]
        if batch:
            cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=batch))
        for d, o in zip(digests, action.outputs, strict=True):
            if d.hash in absent and len(o) > BATCH_LIMIT:
                name = f"uploads/pipeline/blobs/{d.hash}/{d.size_bytes}"
                chunks = [
                    bs_pb2.WriteRequest(
                        resource_name=name if i == 0 else "",
                        write_offset=i,
                        data=o[i : i + (1 << 20)],
                        finish_write=i + (1 << 20) >= len(o),
                    )
                    for i in range(0, len(o), 1 << 20)
                ]
                bytestream.Write(iter(chunks))
        ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(
                action_digest=action.key,
                action_result=re_pb2.ActionResult(
                    exit_code=0,
                    output_files=[
                        re_pb2.OutputFile(path=f"out/{i}", digest=d) for i, d in enumerate(digests)
                    ],
                ),
            )
        )
        return False, sum(len(o) for o in action.outputs)

    started = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        outcomes = list(pool.map(one, actions))
    cache_seconds = time.perf_counter() - started
    channel.close()
    missed = [a.compute_s for a, (hit, _) in zip(actions, outcomes, strict=True) if not hit]
    return BuildResult(
        cache,
        len(actions) - len(missed),
        len(missed),
        round(lpt_makespan(missed, cores), 3),
        round(cache_seconds, 3),
        sum(moved for _, moved in outcomes),
    )


@dataclass
class ShardStage:
    n: int
    predicted: float  # the plan's makespan from the history, tests only, scaled
    actual: float  # slowest shard on the later run's durations, scaled
    startup: float  # per-shard pytest start-up and collection, scaled
    lower_bound: float  # max(total / n, longest test) on the later run, scaled


def shard_startup(history_xml: pathlib.Path, later_xml: pathlib.Path) -> float:
    """Start-up + collection of one pytest process, from the recorded unsplit runs'
    wall times (benchmarks/data/<suite>-runs.json) minus their test time; 0 if unknown."""
    meta_path = history_xml.with_name(history_xml.name.rsplit("-run", 1)[0] + "-runs.json")
    if not meta_path.exists():
        return 0.0
    walls = json.loads(meta_path.read_text())["walls"]
    spent = []
    for wall, xml in zip(walls, (history_xml, later_xml), strict=False):
        _, times, _ = read_run(xml)
        spent.append(max(0.0, wall - sum(times.values())))
    return min(spent) if spent else 0.0


def shard_stages(
    history_xml: pathlib.Path, later_xml: pathlib.Path, counts: list[int], scale: float
) -> list[ShardStage]:
    _, _, hist_cases = read_run(history_xml)
    tests, actual, _ = read_run(later_xml)
    est = history.estimate(tests, [history.run_from_cases(hist_cases)])
    startup = shard_startup(history_xml, later_xml)
    stages = []
    for n in counts:
        plan = split_tests(est.tests, n, "auto", file_costs=est.file_costs)
        slowest = max(sum(actual[t] for t in s.tests) for s in plan.shards)
        bound = max(sum(actual.values()) / n, max(actual.values()))
        stages.append(
            ShardStage(
                n,
                round(plan.makespan * scale, 3),
                round(slowest * scale, 3),
                round(startup * scale, 3),
                round(bound * scale, 3),
            )
        )
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it runs")
    parser.add_argument("--history", type=pathlib.Path, default=DATA / "slipstream-run1.xml")
    parser.add_argument("--later", type=pathlib.Path, default=DATA / "slipstream-run2.xml")
    parser.add_argument(
        "--scale", type=float, default=60.0, help="multiply test times (default 60)"
    )
    parser.add_argument("--shards", default="1,2,4,8,16,32", help="runner counts N")
    parser.add_argument("--targets", default="10,20,45", help="pipeline targets, minutes")
    parser.add_argument("--actions", type=int, default=2000, help="build actions")
    parser.add_argument("--action-seconds", type=float, default=6.0, help="mean compute")
    parser.add_argument("--output-kib", type=float, default=64.0, help="mean output size")
    parser.add_argument("--build-cores", type=int, default=8, help="the build runner's cores")
    parser.add_argument(
        "--runner-overhead", type=float, default=60.0, help="seconds per job: boot, checkout"
    )
    parser.add_argument(
        "--storage-dir",
        type=pathlib.Path,
        default=default_storage_dir(),
    )
    parser.add_argument("--json", type=pathlib.Path, default=HERE / "pipeline_results.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.actions, args.output_kib = 40, 8.0
    counts = [int(n) for n in args.shards.split(",")]
    targets = [float(t) for t in args.targets.split(",")]

    actions = make_actions(args.actions, args.action_seconds, args.output_kib, seed=8)
    with tempfile.TemporaryDirectory(dir=args.storage_dir) as tmp:
        server = ServerProcess(pathlib.Path(tmp) / "store").start()
        try:
            cold = build(server.address, actions, args.build_cores, "cold")
            warm = build(server.address, actions, args.build_cores, "warm")
        finally:
            server.stop()
    stages = shard_stages(args.history, args.later, counts, args.scale)

    over = args.runner_overhead
    print(
        f"build: {args.actions} actions, mean compute {args.action_seconds}s, "
        f"{args.build_cores} cores, outputs ~{args.output_kib:.0f} KiB"
    )
    for b in (cold, warm):
        print(
            f"  {b.cache}: {b.hits} hits, {b.misses} misses; compute {b.compute_seconds:.1f}s "
            f"(simulated) + cache {b.cache_seconds:.2f}s (measured, {b.bytes_moved >> 20} MiB)"
        )
    print(
        f"tests: {args.later.name} times x{args.scale:g}; per shard start-up "
        f"{stages[0].startup:.1f}s; every job +{over:.0f}s runner overhead"
    )
    header = f"{'N':>4} {'tests':>8} {'bound':>8} {'cold':>8} {'warm':>8}"
    print(header + "  targets met (cold / warm)")
    rows = []
    for s in stages:
        test_stage = over + s.startup + s.actual
        total = {b.cache: over + b.seconds + test_stage for b in (cold, warm)}
        met = {
            k: [t for t in targets if v <= t * 60] for k, v in total.items()
        }  # minutes -> seconds
        rows.append({**asdict(s), "cold_total": total["cold"], "warm_total": total["warm"]})
        print(
            f"{s.n:>4} {s.actual / 60:>7.1f}m {s.lower_bound / 60:>7.1f}m "
            f"{total['cold'] / 60:>7.1f}m {total['warm'] / 60:>7.1f}m  "
            f"{','.join(f'{t:g}' for t in met['cold']) or '-'} / "
            f"{','.join(f'{t:g}' for t in met['warm']) or '-'}"
        )
    smallest = {}
    for cache in ("cold", "warm"):
        for t in targets:
            ok = [r["n"] for r in rows if r[f"{cache}_total"] <= t * 60]
            smallest[f"{cache} <= {t:g} min"] = min(ok) if ok else None
    print("smallest N: " + "; ".join(f"{k}: {v or 'none'}" for k, v in smallest.items()))
    out = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "build": [{**asdict(b), "seconds": b.seconds} for b in (cold, warm)],
        "tests": rows,
        "smallest_n": smallest,
    }
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
