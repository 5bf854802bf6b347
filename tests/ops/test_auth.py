"""Tokens and scopes over a real socket: every scope, every denial, anonymous access, health.

One server with a token file (reader, builder, trusted) and anonymous read-only
access; another with anonymous access off; the open server (no token file) is
what every other test suite runs against.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from slipstream.protos import bytestream_pb2 as bs_pb2
from slipstream.protos import layers_pb2, layers_pb2_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.ops.helpers import Token, channel_for, write_token_file
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, running

READER = Token("reader", "tok-reader-3f1c9a", ("read",))
BUILDER = Token("builder", "tok-builder-77ab02", ("read", "cas-write"))
TRUSTED = Token("trusted", "tok-trusted-e41d6b", ("read", "cas-write", "ac-write"))
EMPTY = digest(b"")
OK = grpc.StatusCode.OK


def _attempt(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def _operations(ch: grpc.Channel) -> dict[str, tuple[str | None, Callable[[], object]]]:
    """name -> (scope it needs, a call that makes it); each call is harmless to repeat."""
    api = Reapi(ch)
    layers = layers_pb2_grpc.LayersStub(ch)
    blob = b"auth test blob"
    d = digest(blob)
    name = f"uploads/u1/blobs/{d.hash}/{d.size_bytes}"
    return {
        "GetCapabilities": (
            None,
            lambda: api.caps.GetCapabilities(re_pb2.GetCapabilitiesRequest()),
        ),
        "FindMissingBlobs": ("read", lambda: api.missing(d)),
        "BatchReadBlobs": (
            "read",
            lambda: api.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[d])),
        ),
        "GetTree": ("read", lambda: api.cas.GetTree(re_pb2.GetTreeRequest(root_digest=EMPTY))),
        "Read": ("read", lambda: api.read(EMPTY)),
        "GetActionResult": (
            "read",
            lambda: _attempt_not_found(
                lambda: api.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=d))
            ),
        ),
        "GetLayer": (
            "read",
            lambda: _attempt_not_found(
                lambda: layers.GetLayer(layers_pb2.GetLayerRequest(key="no-such-layer"))
            ),
        ),
        "BatchUpdateBlobs": ("cas-write", lambda: api.upload(blob)),
        "Write": ("cas-write", lambda: api.write(blob, upload_id="auth")),
        "QueryWriteStatus": (
            "cas-write",
            lambda: api.bytestream.QueryWriteStatus(
                bs_pb2.QueryWriteStatusRequest(resource_name=name)
            ),
        ),
        "UpdateActionResult": (
            "ac-write",
            lambda: api.ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    action_digest=d, action_result=re_pb2.ActionResult(exit_code=0)
                )
            ),
        ),
        "PutLayer": (
            "ac-write",
            lambda: layers.PutLayer(
                layers_pb2.PutLayerRequest(key="auth-layer", root_digest=EMPTY, overwrite=True)
            ),
        ),
    }


def _attempt_not_found(call: Callable[[], object]) -> object:
    """A lookup that misses is allowed: NOT_FOUND counts as let in."""
    try:
        return call()
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            return None
        raise


@pytest.fixture(scope="module")
def tokens_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("auth")
    token_file = write_token_file(root / "tokens.toml", [READER, BUILDER, TRUSTED])
    server = ServerProcess(root / "store", ["--token-file", str(token_file), "--anonymous", "read"])
    with running(server):
        yield server


@pytest.mark.parametrize(
    ("token", "scopes"),
    [
        (READER, {"read"}),
        (BUILDER, {"read", "cas-write"}),
        (TRUSTED, {"read", "cas-write", "ac-write"}),
        (None, {"read"}),  # anonymous, read-only on this server
    ],
    ids=["reader", "builder", "trusted", "anonymous"],
)
def test_each_scope_allows_its_calls_and_denies_the_rest(
    tokens_server: ServerProcess, token: Token | None, scopes: set[str]
) -> None:
    with channel_for(tokens_server, token.value if token else None) as ch:
        for method, (needs, call) in _operations(ch).items():
            code, message = _attempt(call)
            if needs is None or needs in scopes:
                assert code is OK, f"{method}: {code} {message}"
            else:
                assert code is grpc.StatusCode.PERMISSION_DENIED, f"{method}: {code} {message}"
                who = f"caller {token.name!r}" if token else "an anonymous caller"
                assert message == f"{method} needs scope {needs!r}, which {who} does not have"


@pytest.mark.parametrize(
    ("token", "enabled"), [(READER, False), (BUILDER, False), (TRUSTED, True), (None, False)]
)
def test_capabilities_report_update_enabled_per_caller(
    tokens_server: ServerProcess, token: Token | None, enabled: bool
) -> None:
    with channel_for(tokens_server, token.value if token else None) as ch:
        caps = Reapi(ch).caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
        assert caps.cache_capabilities.action_cache_update_capabilities.update_enabled is enabled


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Bearer not-a-known-token", "the token is not known to this server"),
        ("Basic dXNlcjpwYXNz", "the authorization header must be 'Bearer TOKEN'"),
        ("Bearer", "the authorization header must be 'Bearer TOKEN'"),
        # The hash of a token is not a token: a leaked token file grants nothing.
        (f"Bearer {'0' * 64}", "the token is not known to this server"),
    ],
)
def test_bad_tokens_are_unauthenticated_even_with_anonymous_reads(
    tokens_server: ServerProcess, header: str, reason: str
) -> None:
    with channel_for(tokens_server, headers=[("authorization", header)]) as ch:
        code, message = _attempt(lambda: Reapi(ch).missing(EMPTY))
    assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED, reason)


def test_written_blobs_and_results_are_visible_to_readers(tokens_server: ServerProcess) -> None:
    data = b"written by trusted, read by reader"
    action = digest(b"action for readers")
    with channel_for(tokens_server, TRUSTED.value) as ch:
        api = Reapi(ch)
        (d,) = api.upload(data)
        result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="out", digest=d)])
        api.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
        )
    with channel_for(tokens_server, READER.value) as ch:
        api = Reapi(ch)
        assert api.read(d) == data
        got = api.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action))
        assert got.output_files[0].digest == d


def _health_and_reflection(ch: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(ch)
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    resp = health.Check(
        health_pb2.HealthCheckRequest(service="build.bazel.remote.execution.v2.ActionCache"),
        timeout=10,
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    replies = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert "build.bazel.remote.execution.v2.ContentAddressableStorage" in names
    assert "grpc.health.v1.Health" in names


def test_anonymous_off_refuses_everything_but_health(tmp_path: pathlib.Path) -> None:
    token_file = write_token_file(tmp_path / "tokens.toml", [READER])
    server = ServerProcess(tmp_path / "store", ["--token-file", str(token_file)])
    with running(server):
        with channel_for(server) as ch:
            for method, (_, call) in _operations(ch).items():
                code, message = _attempt(call)
                assert code is grpc.StatusCode.UNAUTHENTICATED, method
                assert message == "this server needs a token: send 'authorization: Bearer TOKEN'"
            # Probes and tooling carry no token: health and reflection stay open.
            _health_and_reflection(ch)
        with channel_for(server, READER.value) as ch:
            assert Reapi(ch).missing(EMPTY) == []


def test_health_and_reflection_need_no_token(tokens_server: ServerProcess) -> None:
    with channel_for(tokens_server) as ch:
        _health_and_reflection(ch)


def test_open_server_without_token_file_lets_everyone_write(server: ServerProcess) -> None:
    """No token file: today's behaviour, so every other suite keeps passing unchanged."""
    with channel_for(server, headers=[("authorization", "Bearer ignored")]) as ch:
        for method, (_, call) in _operations(ch).items():
            code, message = _attempt(call)
            assert code is OK, f"{method}: {code} {message}"
        caps = Reapi(ch).caps.GetCapabilities(re_pb2.GetCapabilitiesRequest())
        assert caps.cache_capabilities.action_cache_update_capabilities.update_enabled
