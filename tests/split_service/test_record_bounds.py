"""Timing and plan records count toward the store's size bound and are evicted like
blobs: a real server with `--max-size 2M`, on the disk and the memory store."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from slipstream.protos import split_pb2
from slipstream.protos import split_pb2_grpc as split_grpc
from tests.ops.helpers import metrics_url, scrape
from tests.support.server_process import ServerProcess, running

BOUND = 2 << 20


@pytest.fixture(params=["disk", "memory"])
def bounded(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[ServerProcess]:
    storage = tmp_path / "store" if request.param == "disk" else "memory://"
    args = ["--max-size", "2M", "--metrics-listen", "127.0.0.1:0"]
    with running(ServerProcess(storage, args)) as server:
        yield server


def _upload(stub: split_grpc.SplitStub, run: int) -> None:
    """~1 MiB of timings: one record of the suite's history."""
    timings = [
        split_pb2.TestTiming(test_id=f"tests/test_{run:02d}_{i:05d}.py::" + "x" * 80, seconds=1.0)
        for i in range(10_000)
    ]
    reply = stub.UploadTimings(
        iter([split_pb2.UploadTimingsRequest(suite="big", run_id=f"run-{run}", timings=timings)])
    )
    assert reply.tests == 10_000


def _stored_bytes(root: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def test_timing_and_plan_records_stay_within_the_bound(bounded: ServerProcess) -> None:
    stub = split_grpc.SplitStub(bounded.channel())
    for run in range(20):  # 20 MiB of history into a 2 MiB store
        _upload(stub, run)
        tests = [f"tests/test_{run:02d}_{i:05d}.py::t" for i in range(5_000)]
        spec = split_pb2.RunSpec(suite="big", run_key=f"pipeline-{run}", total=4, test_ids=tests)
        assert stub.GetShard(split_pb2.GetShardRequest(run=spec)).pinned_now
    metrics = scrape(metrics_url(bounded))
    assert metrics[("slipstream_store_bytes", ())] <= BOUND
    assert metrics[("slipstream_store_evictions_total", ())] >= 18
    if isinstance(bounded.storage, pathlib.Path):
        assert _stored_bytes(bounded.storage) <= BOUND + (64 << 10)  # what is on the disk
    # The newest history is kept and used: the last run plans from it.
    last = [f"tests/test_19_{i:05d}.py::" + "x" * 80 for i in range(100)]
    spec = split_pb2.RunSpec(suite="big", run_key="next", total=2, test_ids=last)
    assert stub.GetShard(split_pb2.GetShardRequest(run=spec)).from_history
