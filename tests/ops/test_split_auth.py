"""A run's queue belongs to the token that made it: a pull request's cas-write token
cannot lease or complete a trusted run's tests, lease ids cannot be guessed, and the
split service's writes are in the audit log. A real server with a token file."""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import grpc
import pytest

from slipstream.protos import split_pb2
from slipstream.protos import split_pb2_grpc as split_grpc
from tests.ops.helpers import Token, channel_for, code_of
from tests.ops.helpers import write_token_file as _write_tokens
from tests.support.server_process import ServerProcess, running

TRUSTED = Token("ci-main", "tok-main-5eed1234", ("read", "cas-write", "ac-write"))
PULL_REQUEST = Token("ci-pr", "tok-pr-0badc0de", ("read", "cas-write"))
TESTS = [f"tests/test_{f}.py::test_{i}" for f in "abcd" for i in range(10)]
RUN = split_pb2.RunSpec(suite="unit", run_key="pipeline-4711", total=2, index=0, test_ids=TESTS)


@dataclass
class Served:
    server: ServerProcess
    audit: pathlib.Path


@pytest.fixture
def served(tmp_path: pathlib.Path) -> Iterator[Served]:
    tokens = _write_tokens(tmp_path / "tokens.toml", [TRUSTED, PULL_REQUEST])
    audit = tmp_path / "audit.jsonl"
    args = ["--token-file", str(tokens), "--audit-log", str(audit)]
    with running(ServerProcess(tmp_path / "store", args)) as server:
        yield Served(server, audit)


def _lease(stub: split_grpc.SplitStub, runner: str) -> split_pb2.LeaseResponse:
    return stub.Lease(split_pb2.LeaseRequest(suite="unit", run_key=RUN.run_key, runner=runner))


def _complete(stub: split_grpc.SplitStub, lease_id: str, tests: list[str]) -> object:
    return stub.Complete(
        split_pb2.CompleteRequest(
            suite="unit",
            run_key=RUN.run_key,
            lease_id=lease_id,
            runner="intruder",
            results=[split_pb2.TestTiming(test_id=t, seconds=0.1) for t in tests],
        )
    )


def test_another_token_can_neither_lease_nor_complete_a_trusted_runs_queue(
    served: Served,
) -> None:
    with (
        channel_for(served.server, TRUSTED.value) as main_ch,
        channel_for(served.server, PULL_REQUEST.value) as pr_ch,
    ):
        main, pr = split_grpc.SplitStub(main_ch), split_grpc.SplitStub(pr_ch)
        assert main.JoinQueue(split_pb2.JoinQueueRequest(run=RUN)).pinned_now
        first = _lease(main, "main-0")
        assert first.test_ids
        # The pull request's token does not see the trusted queue at all...
        code, details = code_of(lambda: _lease(pr, "intruder"))
        assert code is grpc.StatusCode.NOT_FOUND and "JoinQueue first" in details
        # ...nor complete its lease, even knowing the lease id.
        code, _ = code_of(lambda: _complete(pr, first.lease_id, list(first.test_ids)))
        assert code is grpc.StatusCode.NOT_FOUND
        # Joining the same run key gives it a queue of its own, which it may drain...
        assert pr.JoinQueue(split_pb2.JoinQueueRequest(run=RUN)).pinned_now
        while (lease := _lease(pr, "intruder")).lease_id:
            _complete(pr, lease.lease_id, list(lease.test_ids))
        assert lease.finished
        # ...while the trusted run is untouched: nothing completed, its batches still there.
        status = main.QueueStatus(split_pb2.QueueStatusRequest(suite="unit", run_key=RUN.run_key))
        assert (status.completed, status.tests) == (0, len(TESTS))
        assert not _lease(main, "main-1").finished
        # A reader may name the owner of the run it looks at.
        theirs = pr.QueueStatus(
            split_pb2.QueueStatusRequest(suite="unit", run_key=RUN.run_key, owner="ci-main")
        )
        assert theirs.completed == 0 and theirs.plan_hash == status.plan_hash


def test_lease_ids_cannot_be_guessed(served: Served) -> None:
    with channel_for(served.server, TRUSTED.value) as ch:
        stub = split_grpc.SplitStub(ch)
        stub.JoinQueue(split_pb2.JoinQueueRequest(run=RUN))
        first, second = _lease(stub, "r0"), _lease(stub, "r1")
        name, _, secret = first.lease_id.rpartition(".")
        assert name == "000000.000" and len(secret) >= 22
        assert second.lease_id.rpartition(".")[2] != secret
        # The batch and attempt alone, or with a wrong secret, complete nothing.
        for guess in (name, f"{name}.{'A' * len(secret)}", second.lease_id[:-1] + "x"):
            code, _ = code_of(partial(_complete, stub, guess, list(first.test_ids)))
            assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert _complete(stub, first.lease_id, list(first.test_ids))


def _audit(path: pathlib.Path, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} audit lines: {path.read_text()}")


def test_split_writes_are_audited_reads_are_not(served: Served) -> None:
    with channel_for(served.server, TRUSTED.value) as ch:
        stub = split_grpc.SplitStub(ch)
        stub.UploadTimings(
            iter(
                [
                    split_pb2.UploadTimingsRequest(
                        suite="unit",
                        run_id="pipeline-4710",
                        timings=[split_pb2.TestTiming(test_id=t, seconds=1.0) for t in TESTS],
                    )
                ]
            )
        )
        assert stub.GetShard(split_pb2.GetShardRequest(run=RUN)).pinned_now
        stub.GetShard(split_pb2.GetShardRequest(run=RUN))  # a read of the pinned plan
        stub.JoinQueue(split_pb2.JoinQueueRequest(run=RUN))
        stub.JoinQueue(split_pb2.JoinQueueRequest(run=RUN))
        lease = _lease(stub, "r0")
        _complete(stub, lease.lease_id, list(lease.test_ids))
        stub.QueueStatus(split_pb2.QueueStatusRequest(suite="unit", run_key=RUN.run_key))
    with channel_for(served.server, PULL_REQUEST.value) as ch:
        refused = split_pb2.RunSpec(suite="unit", run_key="k", total=0)
        assert (
            code_of(
                lambda: split_grpc.SplitStub(ch).GetShard(split_pb2.GetShardRequest(run=refused))
            )[0]
            is grpc.StatusCode.INVALID_ARGUMENT
        )
    lines = _audit(served.audit, 5)
    assert [(r["event"], r["caller"], r["outcome"]) for r in lines] == [
        ("timings_upload", "ci-main", "OK"),
        ("split_plan", "ci-main", "OK"),
        ("split_queue", "ci-main", "OK"),
        ("split_complete", "ci-main", "OK"),
        ("split_plan", "ci-pr", "INVALID_ARGUMENT"),
    ]
    upload, plan, queue, complete, bad = lines
    assert (upload["suite"], upload["run_id"], upload["tests"]) == ("unit", "pipeline-4710", 40)
    assert (plan["run_key"], plan["total"], plan["tests"]) == ("pipeline-4711", 2, 40)
    assert plan["plan_hash"] and queue["plan_hash"]
    assert complete["lease"] == "000000.000" and complete["results"] == len(lease.test_ids)
    assert "total must be" in str(bad["reason"])
    text = served.audit.read_text()
    secret = lease.lease_id.rpartition(".")[2]
    assert secret not in text and TRUSTED.value not in text and PULL_REQUEST.value not in text
