"""A digest is its hash and its size together: the right hash under a wrong size names
nothing, on every path of every local store (issue 19, item 7)."""

from __future__ import annotations

import functools
import hashlib

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.reapi import Reapi, digest, rpc_error
from tests.support.server_process import ServerProcess

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
MAX_SIZE = (1 << 63) - 1


@pytest.fixture
def api(any_store_server: ServerProcess) -> Reapi:
    return Reapi(any_store_server.channel())


@SETTINGS
@given(
    data=st.binary(min_size=1, max_size=3000),
    wrong=st.one_of(st.integers(min_value=0, max_value=4000), st.just(MAX_SIZE)),
)
def test_right_hash_wrong_size_is_absent_everywhere(api: Reapi, data: bytes, wrong: int) -> None:
    if wrong == len(data):
        wrong = 0
    stored = api.upload(data)[0]
    bad = re_pb2.Digest(hash=stored.hash, size_bytes=wrong)

    assert [d.size_bytes for d in api.missing(bad, stored)] == [wrong]

    if wrong < 1 << 20:  # larger is over the batch limit
        batch = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[bad]))
        assert batch.responses[0].status.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert batch.responses[0].data == b""

    for offset in {0, min(1, wrong), wrong // 2}:
        failure = rpc_error(functools.partial(api.read, bad, offset=offset))
        assert failure.code() == grpc.StatusCode.NOT_FOUND, failure

    tree = rpc_error(
        lambda: api.cas.GetTree(re_pb2.GetTreeRequest(root_digest=bad))  # type: ignore[arg-type]
    )
    assert tree.code() == grpc.StatusCode.NOT_FOUND, tree

    # An action result naming the blob under the wrong size is not complete.
    action = digest(b"action " + data + wrong.to_bytes(8, "little"))
    result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="out", digest=bad)])
    api.ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
    )
    failure = rpc_error(
        lambda: api.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
    )
    assert failure.code() == grpc.StatusCode.NOT_FOUND, failure

    # The stored blob is untouched by all of that.
    assert api.read(stored) == data
    assert api.missing(stored) == []


def test_empty_hash_with_a_size_is_missing(api: Reapi) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    bad = re_pb2.Digest(hash=empty, size_bytes=5)
    assert list(api.missing(bad)) == [bad]
    batch = api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[bad]))
    assert batch.responses[0].status.code == grpc.StatusCode.NOT_FOUND.value[0]
