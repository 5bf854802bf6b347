"""The split service over a real socket: a `slipstream serve` process and its client."""

from __future__ import annotations

import concurrent.futures
import pathlib
import time

import grpc
import pytest

from slipstream.cache_server.storage.disk import DiskStore
from slipstream.client.split_client import RunSpec, SplitClient, SplitRefused
from slipstream.protos import split_pb2
from slipstream.protos import split_pb2_grpc as split_grpc
from slipstream.splitter import history
from slipstream.splitter.history import Sample
from slipstream.splitter.pinning import make_plan
from tests.support.server_process import ServerProcess

TESTS = [f"tests/test_{f}.py::test_{i}" for f in "abcdef" for i in range(5)]


def junit_report(times: dict[str, float]) -> bytes:
    cases = "".join(
        f'<testcase classname="tests.{t.split("/")[1].split(".")[0]}" '
        f'name="{t.split("::")[1]}" file="{t.split("::")[0]}" time="{s}"/>'
        for t, s in times.items()
    )
    return f"<testsuites><testsuite>{cases}</testsuite></testsuites>".encode()


@pytest.fixture
def client(server: ServerProcess):
    with SplitClient(server.address) as c:
        yield c


def test_plan_is_pinned_per_run_key_and_agreed_by_concurrent_first_callers(client, server):
    # Eight runners ask at once: one pins, every one gets its shard of that plan.
    with SplitClient(server.address) as other, concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda i: (client if i % 2 else other).get_shard(
                    RunSpec("suite", "run-1", i, 8, list(reversed(TESTS)) if i % 3 else TESTS)
                ),
                range(8),
            )
        )
    assert len({a.plan_hash for a in answers}) == 1
    ran = [t for a in answers for t in a.tests]
    assert sorted(ran) == sorted(TESTS)
    # New timings arrive mid-run: the run (and a retried job) keeps its plan...
    times = {t: 10.0 if t.endswith("_0") else 0.1 for t in TESTS}
    assert client.upload_timings("suite", "r0", [junit_report(times)]) == (1, len(TESTS))
    again = client.get_shard(RunSpec("suite", "run-1", 3, 8, TESTS))
    assert again.plan_hash == answers[3].plan_hash and again.tests == answers[3].tests
    # ...while a new run plans from them: the six 10 s tests on six different shards.
    fresh = [client.get_shard(RunSpec("suite", "run-2", i, 8, TESTS)) for i in range(8)]
    assert fresh[0].from_history and fresh[0].plan_hash != answers[0].plan_hash
    slow = [sum(t.endswith("_0") for t in a.tests) for a in fresh]
    assert sorted(slow) == [0, 0, 1, 1, 1, 1, 1, 1]


def test_runners_that_collected_other_tests_are_told_clearly(client):
    client.get_shard(RunSpec("suite", "run-x", 0, 2, TESTS))
    with pytest.raises(SplitRefused) as err:
        client.get_shard(RunSpec("suite", "run-x", 1, 2, [*TESTS[3:], "tests/test_new.py::test_n"]))
    message = str(err.value)
    assert "FAILED_PRECONDITION" not in message  # the details, in one line
    assert "3 planned but not collected here (e.g. tests/test_a.py::test_0" in message
    assert "1 collected here but not planned (e.g. tests/test_new.py::test_n)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            split_pb2.GetShardRequest(run=split_pb2.RunSpec(suite="s", run_key="k", total=0)),
            "total must be",
        ),
        (
            split_pb2.GetShardRequest(
                run=split_pb2.RunSpec(suite="s", run_key="k", total=2, index=2)
            ),
            "index must be",
        ),
        (
            split_pb2.GetShardRequest(run=split_pb2.RunSpec(suite="s/../x", run_key="k", total=1)),
            "suite name",
        ),
        (
            split_pb2.GetShardRequest(run=split_pb2.RunSpec(suite="s", run_key="", total=1)),
            "run key",
        ),
        (
            split_pb2.GetShardRequest(
                run=split_pb2.RunSpec(suite="s", run_key="k", total=1, granularity="x")
            ),
            "gran",
        ),
    ],
)
def test_bad_requests_are_invalid_argument(channel, request_, message):
    stub = split_grpc.SplitStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetShard(request_, timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(err.value.details())


def test_bad_uploads_and_queue_calls_get_the_right_status(channel):
    stub = split_grpc.SplitStub(channel)
    cases = [
        (
            lambda: stub.UploadTimings(
                iter([split_pb2.UploadTimingsRequest(suite="s", junit_xml=b"<html/>")])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a JUnit report",
        ),
        (
            lambda: stub.Lease(split_pb2.LeaseRequest(suite="s", run_key="none")),
            grpc.StatusCode.NOT_FOUND,
            "JoinQueue first",
        ),
        (
            lambda: stub.Complete(split_pb2.CompleteRequest(suite="s", run_key="k", lease_id="1")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lease id",
        ),
    ]
    for call, code, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is code and message in str(err.value.details())


def test_queue_leases_expire_back_and_completions_count_once(client, server):
    info = client.join_queue(RunSpec("q", "run-q", 0, 2, TESTS))
    assert info.tests == len(TESTS) and info.batches >= 2
    with pytest.raises(SplitRefused, match="not planned"):
        client.join_queue(RunSpec("q", "run-q", 1, 2, [*TESTS, "tests/x.py::test_y"]))
    # Runner A leases the first batch with a 1 s lease and dies.
    dead = client.lease("q", "run-q", "A", lease_seconds=1.0)
    assert dead.lease_id.startswith("000000.000.") and dead.tests
    # Runner B drains the rest; then the dead lease's tests come back to it.
    ran: list[str] = []
    leased_again = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lease = client.lease("q", "run-q", "B", lease_seconds=30.0)
        if lease.finished:
            break
        if not lease.lease_id:
            time.sleep(lease.retry_after)
            continue
        assert not set(lease.tests) & set(ran)  # completed tests are never leased again
        if lease.lease_id.startswith("000000.001."):
            leased_again = lease
        results = {t: Sample(0.5, t.endswith("_1")) for t in lease.tests}
        client.complete("q", "run-q", lease.lease_id, "B", results)
        ran.extend(lease.tests)
    assert leased_again is not None and leased_again.tests == dead.tests
    assert sorted(ran) == sorted(TESTS)
    # A wakes up and reports late: its tests count once; a foreign result is refused.
    client.complete("q", "run-q", dead.lease_id, "A", {dead.tests[0]: Sample(9.0, False)})
    with pytest.raises(SplitRefused, match="not tests of lease"):
        client.complete("q", "run-q", dead.lease_id, "A", {"tests/x.py::y": Sample(1, False)})
    status = client.status("q", "run-q")
    assert (status.tests, status.completed, status.pending) == (len(TESTS), len(TESTS), 0)
    assert sorted(r.test_id for r in status.results) == sorted(TESTS)
    assert status.plan_hash == info.plan_hash and list(status.abandoned) == []
    # The finished queue fed the history, once.
    store = DiskStore(pathlib.Path(server.storage))
    try:
        runs, _ = history.load_runs(store, "q")
    finally:
        store.close()
    assert [r.run_id for r in runs] == ["run-q"] and len(runs[0].tests) == len(TESTS)


def test_two_replicas_on_one_store_answer_the_same(tmp_path):
    replicas = [ServerProcess(tmp_path / "store").start() for _ in range(2)]
    try:
        clients = [SplitClient(r.address).open() for r in replicas]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda i: clients[i % 2].get_shard(RunSpec("s", "run", i, 4, TESTS)), range(4)
                )
            )
        assert len({a.plan_hash for a in answers}) == 1
        assert sorted(t for a in answers for t in a.tests) == sorted(TESTS)
        clients[0].join_queue(RunSpec("s", "run", 0, 2, TESTS))
        first = clients[1].lease("s", "run", "r1")
        second = clients[0].lease("s", "run", "r0")
        assert first.lease_id != second.lease_id
        assert not set(first.tests) & set(second.tests)
        for c in clients:
            c.close()
    finally:
        for r in replicas:
            r.stop()


def test_new_timings_replace_a_kept_estimate_whichever_replica_takes_them(tmp_path):
    # A server keeps its estimates of a suite's history between plans; an upload, to it
    # or to another replica on the same store, is a new history that the next plan uses.
    replicas = [ServerProcess(tmp_path / "store").start() for _ in range(2)]
    try:
        a, b = (SplitClient(r.address).open() for r in replicas)

        def uncached_plan(run_key: str) -> str:
            # What a server that keeps nothing plans from the store's history now.
            store = DiskStore(tmp_path / "store")
            try:
                runs, _ = history.load_runs(store, "s")
            finally:
                store.close()
            estimates, groups = history.estimate(TESTS, runs), history.groups_of(runs)
            return make_plan(run_key, TESTS, 6, estimates, "auto", groups).plan_hash

        hashes = []
        for step, (via, slow) in enumerate([(a, "test_a"), (b, "test_b"), (a, "test_c")]):
            times = {t: 10.0 if f"/{slow}." in t else 0.1 for t in TESTS}
            via.upload_timings("s", f"r{step}", [junit_report(times)])
            got = a.get_shard(RunSpec("s", f"run-{step}", 0, 6, TESTS))
            assert got.from_history and got.plan_hash == uncached_plan(f"run-{step}")
            hashes.append(got.plan_hash)
        assert len(set(hashes)) == 3
    finally:
        for r in replicas:
            r.stop()
