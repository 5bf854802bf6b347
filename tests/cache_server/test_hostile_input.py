"""Hostile input gets a clear status and leaves no traceback in the log: digest sizes at
the int64 limit, and garbage sent to gRPC's own health and reflection services, which
need no token (issue 19, item 9)."""

from __future__ import annotations

import pathlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream.protos import layers_pb2
from slipstream.protos import layers_pb2_grpc as layers_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.support.reapi import Reapi, rpc_error
from tests.support.server_process import ServerProcess, free_port, running

MAX_SIZE = (1 << 63) - 1
GARBAGE = b"\xff\xff\xff\xff\x0f garbage \x00\x01"


def _no_traceback(server: ServerProcess) -> None:
    server.stop()
    log = "".join(server.output)
    assert "Traceback" not in log, log
    assert "Exception" not in log, log


def test_sizes_at_the_int64_limit_are_answered_not_crashed_on(server: ServerProcess) -> None:
    api = Reapi(server.channel())
    stored = api.upload(b"a directory, or not")[0]
    huge = re_pb2.Digest(hash=stored.hash, size_bytes=MAX_SIZE)
    tree = rpc_error(lambda: api.cas.GetTree(re_pb2.GetTreeRequest(root_digest=huge)))
    assert tree.code() == grpc.StatusCode.NOT_FOUND, tree
    layers = layers_grpc.LayersStub(server.channel())
    put = rpc_error(lambda: layers.PutLayer(layers_pb2.PutLayerRequest(key="k", root_digest=huge)))
    assert put.code() == grpc.StatusCode.FAILED_PRECONDITION, put
    assert "not in the CAS" in put.details()
    assert [d.size_bytes for d in api.missing(huge)] == [MAX_SIZE]
    _no_traceback(server)


def _identity(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("/grpc.health.v1.Health/Check", "unary_unary"),
        ("/grpc.health.v1.Health/Watch", "unary_stream"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
    ],
)
def test_garbage_to_health_and_reflection_is_invalid_argument(
    server: ServerProcess, method: str, kind: str
) -> None:
    channel = server.channel()
    make = getattr(channel, kind)
    call = make(method, request_serializer=_identity, response_deserializer=_identity)
    for _ in range(3):
        if kind.startswith("stream"):
            failure = rpc_error(lambda: call(iter([GARBAGE]), timeout=10))
        else:
            failure = rpc_error(lambda: call(GARBAGE, timeout=10))
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT, failure
        assert "does not parse" in failure.details()
    # The services still work for requests that parse.
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    _no_traceback(server)


def test_garbage_to_the_probe_port_is_invalid_argument(tmp_path: pathlib.Path) -> None:
    port = free_port()
    probe = ServerProcess(tmp_path / "store", ["--health-listen", f"127.0.0.1:{port}"])
    with running(probe):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=_identity,
                response_deserializer=_identity,
            )
            failure = rpc_error(lambda: call(GARBAGE, timeout=10))
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT, failure
        _no_traceback(probe)
