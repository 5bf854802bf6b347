"""What one cheap split call may cost a real server: memory and work bounded by the
request, work given up at the caller's deadline, and a fast SIGTERM meanwhile.

Memory is the server's peak RSS (VmHWM in /proc), CPU its utime + stime in /proc.
"""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from slipstream.protos import split_pb2
from slipstream.protos import split_pb2_grpc as split_grpc
from slipstream.splitter.pinning import MAX_RUN_TESTS
from tests.support.proc_stats import cpu_seconds, peak_rss_bytes
from tests.support.server_process import ServerProcess, running

# ~1 MB of test ids over 10,000 shards: the request that took a server past 4 GiB.
MANY_SHARDS = 10_000
MANY_TESTS = [f"tests/test_{i % 400:03d}.py::test_case_{i:06d}" for i in range(40_000)]


@pytest.fixture
def served(tmp_path: pathlib.Path) -> Iterator[ServerProcess]:
    with running(ServerProcess(tmp_path / "store")) as server:
        yield server


def _pid(server: ServerProcess) -> int:
    assert server.proc is not None
    return server.proc.pid


def _run(suite: str, run_key: str, tests: list[str], total: int) -> split_pb2.RunSpec:
    return split_pb2.RunSpec(suite=suite, run_key=run_key, total=total, index=0, test_ids=tests)


def test_a_plan_over_many_tests_and_shards_costs_memory_linear_in_the_request(
    served: ServerProcess,
) -> None:
    stub = split_grpc.SplitStub(served.channel())
    request = _run("bomb", "run-1", MANY_TESTS, MANY_SHARDS)
    assert 1_000_000 < request.ByteSize() < 2_000_000
    before = peak_rss_bytes(_pid(served))
    started = time.monotonic()
    shard = stub.GetShard(split_pb2.GetShardRequest(run=request), timeout=30)
    joined = stub.JoinQueue(split_pb2.JoinQueueRequest(run=request), timeout=30)
    took = time.monotonic() - started
    grown = peak_rss_bytes(_pid(served)) - before
    assert shard.pinned_now and joined.pinned_now and joined.tests == len(MANY_TESTS)
    # Memory grew with tests + shards (about 100 MiB here), not with tests x shards (GiB).
    assert grown < 256 << 20, f"peak RSS grew {grown >> 20} MiB"
    assert took < 20, f"took {took:.1f}s"


def test_more_tests_than_a_run_may_hold_are_refused_in_one_line(served: ServerProcess) -> None:
    stub = split_grpc.SplitStub(served.channel())
    too_many = [f"t{i}" for i in range(MAX_RUN_TESTS + 1)]
    for call in (
        lambda: stub.GetShard(split_pb2.GetShardRequest(run=_run("s", "k", too_many, 2))),
        lambda: stub.JoinQueue(split_pb2.JoinQueueRequest(run=_run("s", "k", too_many, 2))),
        lambda: stub.UploadTimings(
            iter(
                [
                    split_pb2.UploadTimingsRequest(
                        suite="s", timings=[split_pb2.TestTiming(test_id=t) for t in too_many]
                    )
                ]
            )
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = str(err.value.details())
        assert "200,000" in details and "\n" not in details


def _slow_request(run_key: str) -> split_pb2.GetShardRequest:
    """A plan that takes this server seconds to make: the most tests a run may hold."""
    tests = [f"tests/test_{i % 2000:04d}.py::test_{i:06d}" for i in range(MAX_RUN_TESTS)]
    return split_pb2.GetShardRequest(run=_run("slow", run_key, tests, MANY_SHARDS))


def test_planning_stops_when_the_callers_deadline_passes(served: ServerProcess) -> None:
    stub = split_grpc.SplitStub(served.channel())
    request = _slow_request("deadline")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetShard(request, timeout=0.5)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.5)  # the server notices at its next check
    cpu = cpu_seconds(_pid(served))
    time.sleep(3.0)
    spent = cpu_seconds(_pid(served)) - cpu
    # Without the deadline it would still be planning, a core busy for seconds more.
    assert spent < 0.3, f"{spent:.2f} CPU-seconds after the deadline"


def test_sigterm_during_planning_stops_the_server_fast(served: ServerProcess) -> None:
    stub = split_grpc.SplitStub(served.channel())
    request = _slow_request("sigterm")
    answers: list[grpc.StatusCode] = []

    def call() -> None:
        try:
            stub.GetShard(request, timeout=60)
            answers.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            answers.append(exc.code())

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.0)  # the request is in and being planned
    started = time.monotonic()
    assert served.stop(timeout=20) == 0
    took = time.monotonic() - started
    caller.join(10)
    assert took < 4.0, f"SIGTERM took {took:.1f}s"
    assert answers and answers[0] is not grpc.StatusCode.OK
