"""TLS and mutual TLS on the gRPC port, with certificates the test makes itself.

Handshakes accepted with the right certificates, refused without: a plaintext
client on a TLS port, a client without a certificate on an mTLS port, and a
client whose certificate comes from a CA the server does not trust.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slipstream.protos import layers_pb2, layers_pb2_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.ops.helpers import Pki, Token, channel_for, make_pki, write_token_file
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, output_line, running

TRUSTED = Token("trusted", "tok-tls-trusted-81", ("read", "cas-write", "ac-write"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        Reapi(channel).caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=5)
    return info.value.code()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("tls")
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    args += ["--health-listen", "127.0.0.1:0"]
    server = ServerProcess(root / "store", args, credentials=pki.channel_credentials())
    with running(server):
        yield server


def test_tls_handshake_and_calls(tls_server: ServerProcess) -> None:
    assert "(TLS)" in "".join(tls_server.output)
    with channel_for(tls_server) as ch:
        api = Reapi(ch)
        (d,) = api.upload(b"over TLS")
        assert api.read(d) == b"over TLS"


def test_plaintext_client_is_refused_by_a_tls_port(tls_server: ServerProcess) -> None:
    with grpc.insecure_channel(tls_server.address) as ch:
        assert _refused(ch) is grpc.StatusCode.UNAVAILABLE


def test_client_not_trusting_the_server_is_refused(
    tls_server: ServerProcess, tmp_path: pathlib.Path
) -> None:
    other = make_pki(tmp_path / "other")
    untrusting = grpc.ssl_channel_credentials(other.ca.read_bytes())
    with grpc.secure_channel(tls_server.address, untrusting) as ch:
        assert _refused(ch) is grpc.StatusCode.UNAVAILABLE


def test_probe_port_serves_health_in_plaintext(tls_server: ServerProcess) -> None:
    line = output_line(tls_server, "health checks (plaintext) on")
    address = line.rsplit(" ", 1)[1].strip()
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Only health: the cache itself is not reachable without TLS.
        code = _refused(ch)
        assert code is grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls(pki: Pki, tmp_path: pathlib.Path) -> None:
    tokens = write_token_file(tmp_path / "tokens.toml", [TRUSTED])
    audit = tmp_path / "audit.jsonl"
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    args += ["--tls-client-ca", str(pki.ca), "--token-file", str(tokens)]
    args += ["--audit-log", str(audit)]
    with_cert = pki.channel_credentials(client=True)
    server = ServerProcess(tmp_path / "store", args, credentials=with_cert)
    with running(server):
        assert "(mutual TLS)" in "".join(server.output)
        # A client certificate and a token: both checked.
        with channel_for(server, TRUSTED.value) as ch:
            assert Reapi(ch).missing(digest(b"")) == []
            layers_pb2_grpc.LayersStub(ch).PutLayer(
                layers_pb2.PutLayerRequest(key="mtls", root_digest=digest(b""))
            )
        # The audit log names the certificate as well as the token's caller.
        record = json.loads(audit.read_text().splitlines()[-1])
        assert (record["caller"], record["client_cert"]) == ("trusted", "builder-1")
        # The certificate alone does not make a caller: the token is still needed.
        with channel_for(server) as ch:
            with pytest.raises(grpc.RpcError) as info:
                Reapi(ch).missing(digest(b""))
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # No client certificate: the handshake fails.
        with channel_for(server, TRUSTED.value, credentials=pki.channel_credentials()) as ch:
            assert _refused(ch) is grpc.StatusCode.UNAVAILABLE
        # A certificate from a CA the server does not trust: refused too.
        stranger = pki.channel_credentials(stranger=True)
        with channel_for(server, TRUSTED.value, credentials=stranger) as ch:
            assert _refused(ch) is grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.address) as ch:
            assert _refused(ch) is grpc.StatusCode.UNAVAILABLE


def test_tls_with_workers(pki: Pki, tmp_path: pathlib.Path) -> None:
    """Every worker serves TLS on the shared port."""
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    args += ["--workers", "2"]
    server = ServerProcess(tmp_path / "store", args, credentials=pki.channel_credentials())
    with running(server):
        assert "(TLS)" in "".join(server.output)
        (d,) = Reapi(server.channel()).upload(b"over TLS, to one worker")
        options = [("grpc.use_local_subchannel_pool", 1)]
        for _ in range(6):  # connections of their own, spread over the workers
            with grpc.secure_channel(server.address, pki.channel_credentials(), options) as ch:
                assert Reapi(ch).read(d) == b"over TLS, to one worker"
