"""HTTP requests run on the gRPC calls' pipeline: one limiter per caller, no secrets in logs."""

from __future__ import annotations

import pathlib
import queue
import socket
import time
from collections.abc import Iterator

import grpc
import pytest

from slipstream.protos import bytestream_pb2 as bs_pb2
from tests.http.helpers import HttpClient, http_server, sha256
from tests.ops.helpers import Token, channel_for, code_of, write_token_file
from tests.ops.test_limits import _open_write
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, http_url, running

SOLO = Token("solo", "tok-solo-7d1e", ("read", "cas-write"), (("max_streams", 1),))
OTHER = Token("other", "tok-other-22f0", ("read", "cas-write"))
SECRET = "tok-secret-do-not-log-91ab"
KNOWN = Token("known", SECRET, ("read",))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("pipeline")
    tokens = write_token_file(root / "tokens.toml", [SOLO, OTHER, KNOWN])
    args = ["--token-file", str(tokens), "--log-level", "INFO"]
    with running(http_server(root / "store", args)) as proc:
        yield proc


def _address(server: ServerProcess) -> tuple[str, int]:
    host, _, port = http_url(server).removeprefix("http://").rpartition(":")
    return host, int(port)


def test_a_grpc_stream_counts_against_the_callers_http_requests(server: ServerProcess) -> None:
    url = http_url(server)
    held: tuple[grpc.Future[bs_pb2.WriteResponse], queue.Queue[object]] | None = None
    with channel_for(server, SOLO.value) as ch, HttpClient(url, token=SOLO.value) as http:
        api = Reapi(ch)
        try:
            reply = None
            for attempt in range(100):  # until the held stream has reached the server
                if held is None or held[0].done():
                    held = _open_write(api, f"held-{attempt}")
                time.sleep(0.05)
                reply = http.get(f"/cas/{sha256(b'')}")
                if reply.status == 429:
                    break
            assert reply is not None and reply.status == 429, reply
            assert reply.text == "caller 'solo' has 1 calls in flight already; the limit is 1\n"
            with HttpClient(url, token=OTHER.value) as other:  # another caller: unaffected
                assert other.get(f"/cas/{sha256(b'')}").status == 200
        finally:
            if held is not None:
                held[1].put(None)
        assert held is not None and held[0].result().committed_size == 400
        assert http.get(f"/cas/{sha256(b'held' * 100)}").status == 200  # the stream is over


def test_an_http_upload_counts_against_the_callers_grpc_calls(server: ServerProcess) -> None:
    body = b"slow upload " * 100
    host, port = _address(server)
    with socket.create_connection((host, port), timeout=30) as sock:
        head = (
            f"PUT /cas/{sha256(body)} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {SOLO.value}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[:10])  # the request is in flight, its body unsent
        with channel_for(server, SOLO.value) as ch:
            api = Reapi(ch)
            code, message = grpc.StatusCode.OK, ""
            for _ in range(100):  # until the server has begun the PUT
                code, message = code_of(lambda: api.missing(digest(b"probe")))
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
                time.sleep(0.05)
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert message == "caller 'solo' has 1 calls in flight already; the limit is 1"
            sock.sendall(body[10:])
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            assert api.missing(digest(body)) == []  # the PUT is over: calls go through again


@pytest.mark.parametrize(
    "header_lines",
    [
        f"Authorization: Bearer {SECRET}\r\n folded-onto-the-header",
        f"Authorization: Bearer {SECRET}\x00",
        f"Authorization : Bearer {SECRET}",
        f"X-Bad\x01Name: Bearer {SECRET}",
    ],
    ids=["folded", "nul", "space-before-colon", "bad-name"],
)
def test_a_malformed_header_never_reaches_the_log(
    server: ServerProcess, header_lines: str, tmp_path: pathlib.Path
) -> None:
    host, port = _address(server)
    before = len(server.output)
    with socket.create_connection((host, port), timeout=30) as sock:
        request = f"GET /cas/{sha256(b'')} HTTP/1.1\r\nHost: x\r\n{header_lines}\r\n\r\n"
        sock.sendall(request.encode())
        answer = sock.recv(4096)
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    with HttpClient(http_url(server), token=KNOWN.value) as ok:  # still serving
        assert ok.get(f"/cas/{sha256(b'')}").status == 200
    time.sleep(0.2)  # let the server's log lines arrive
    logged = "".join(server.output[before:])
    assert SECRET not in logged, logged
    assert "Traceback" not in logged, logged
