"""The HTTP cache endpoint (`--http-listen`) against a real server process.

Bazel's /cas and /ac routes and ccache's /ccache routes: keep-alive, streaming,
sharing entries with the gRPC services both ways, the action cache's
completeness check, bad input (a clear 4xx, nothing stored), tokens and scopes,
--read-only-ac, the size bound and LRU for ccache entries, and metrics.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import os
import pathlib
import socket
import ssl
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator

import grpc
import pytest

from slipstream.protos import remote_execution_pb2 as re_pb2
from tests.http.helpers import HttpClient, http_server, sha256
from tests.ops.helpers import (
    Token,
    channel_for,
    make_pki,
    metrics_url,
    scrape,
    write_token_file,
)
from tests.support.proc_stats import peak_rss_bytes
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, http_url, running, serve_exit

# Three ccache keys as ccache 4.7.5 sends them (subdirs layout, flat, bazel).
CC_KEY = "cba9tkltbj1opij2hi4enmkuqlfnoit9g"
CC_SUBDIRS = f"/ccache/team/{CC_KEY[:2]}/{CC_KEY[2:]}"
CC_FLAT = f"/ccache/team/{CC_KEY}"
CC_BAZEL = "/ccache/team/ac/" + "cba9ed2bd5cc38cca628c88ebda9ed55f7c4ba98cba9ed2bd5cc38cca628c88e"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    storage = tmp_path_factory.mktemp("store")
    with running(http_server(storage, ["--metrics-listen", "127.0.0.1:0"])) as proc:
        yield proc


@pytest.fixture
def client(served: ServerProcess) -> Iterator[HttpClient]:
    with HttpClient(http_url(served)) as c:
        yield c


@pytest.fixture
def reapi(served: ServerProcess) -> Iterator[Reapi]:
    with grpc.insecure_channel(served.address) as ch:
        yield Reapi(ch)


def _result_with(*outputs: bytes) -> re_pb2.ActionResult:
    return re_pb2.ActionResult(
        exit_code=0,
        output_files=[
            re_pb2.OutputFile(path=f"out/{i}", digest=digest(data))
            for i, data in enumerate(outputs)
        ],
    )


def test_cas_put_head_get_on_one_kept_alive_connection(client: HttpClient) -> None:
    data = os.urandom(3000)
    path = f"/cas/{sha256(data)}"
    assert client.get(path).status == 404
    sock = client.conn.sock
    assert sock is not None
    local = sock.getsockname()
    assert client.put(path, data).status == 200
    head = client.head(path)
    assert (head.status, head.body, head.headers["Content-Length"]) == (200, b"", "3000")
    got = client.get(path)
    assert (got.status, got.body) == (200, data)
    # An instance prefix names the same CAS (it is shared by every instance).
    assert client.get(f"/some/instance/cas/{sha256(data)}").body == data
    # The empty blob is always there.
    assert client.get(f"/cas/{sha256(b'')}").status == 200
    # Every request so far went over the first connection: keep-alive, no reconnects.
    assert client.conn.sock is sock and sock.getsockname() == local


def test_chunked_put_is_verified_too(client: HttpClient) -> None:
    data = os.urandom(5000)
    path = f"/cas/{sha256(data)}"
    pieces = [data[:1000], data[1000:]]
    # http.client sends an iterator without Content-Length as Transfer-Encoding: chunked.
    assert client.put(path, iter(pieces)).status == 200
    assert client.get(path).body == data
    other = os.urandom(100)
    bad = client.put(f"/cas/{sha256(other)}", iter([data]))
    assert bad.status == 400 and "hashes to" in bad.text
    assert client.get(f"/cas/{sha256(other)}").status == 404


def test_a_64_mib_blob_streams_both_ways(client: HttpClient, served: ServerProcess) -> None:
    size = 64 << 20
    block = os.urandom(1 << 20)
    data = block * (size // len(block))
    path = f"/cas/{sha256(data)}"
    assert served.proc is not None
    peak_rss = functools.partial(peak_rss_bytes, served.proc.pid)

    before = peak_rss()

    def body() -> Iterator[bytes]:
        for i in range(0, size, 1 << 20):
            yield data[i : i + (1 << 20)]

    assert client.put(path, body(), **{"Content-Length": str(size)}).status == 200
    client.conn.request("GET", path)
    resp = client.conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == str(size)
    got = bytearray()
    while chunk := resp.read(1 << 20):
        got += chunk
    assert got == data
    # Neither the PUT nor the GET held the blob in the server's memory.
    assert peak_rss() - before < 32 << 20, (before, peak_rss())


def test_entries_are_shared_with_grpc_both_ways(client: HttpClient, reapi: Reapi) -> None:
    # A blob uploaded over gRPC is read over HTTP.
    over_grpc = os.urandom(2048)
    (d,) = reapi.upload(over_grpc)
    assert client.get(f"/cas/{d.hash}").body == over_grpc
    # A blob PUT over HTTP is read over gRPC ByteStream.
    over_http = os.urandom(4096)
    assert client.put(f"/cas/{sha256(over_http)}", over_http).status == 200
    assert reapi.read(digest(over_http)) == over_http

    # An action result written over gRPC is read over HTTP, under its instance.
    action = digest(b"action written over grpc")
    result = _result_with(over_grpc, over_http)
    reapi.ac.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(
            instance_name="linux/x86", action_digest=action, action_result=result
        )
    )
    got = client.get(f"/linux/x86/ac/{action.hash}")
    assert got.status == 200 and re_pb2.ActionResult.FromString(got.body) == result
    assert client.get(f"/ac/{action.hash}").status == 404  # other instance

    # An action result PUT over HTTP is read over gRPC.
    action2 = digest(b"action written over http")
    result2 = _result_with(over_http)
    put = client.put(f"/linux/x86/ac/{action2.hash}", result2.SerializeToString())
    assert put.status == 200
    read = reapi.ac.GetActionResult(
        re_pb2.GetActionResultRequest(instance_name="linux/x86", action_digest=action2)
    )
    assert read == result2


def test_action_results_are_served_only_when_complete(client: HttpClient) -> None:
    output = os.urandom(700)
    action = sha256(b"incomplete action")
    result = _result_with(output)
    assert client.put(f"/ac/{action}", result.SerializeToString()).status == 200
    assert client.get(f"/ac/{action}").status == 404  # its output is not in the CAS
    assert client.head(f"/ac/{action}").status == 404
    assert client.put(f"/cas/{sha256(output)}", output).status == 200
    got = client.get(f"/ac/{action}")
    assert got.status == 200 and re_pb2.ActionResult.FromString(got.body) == result
    head = client.head(f"/ac/{action}")
    assert head.status == 200 and head.headers["Content-Length"] == str(len(got.body))


@pytest.mark.parametrize(
    ("method", "path", "status", "says"),
    [
        ("GET", "/cas/abc", 400, "not a SHA-256"),
        ("GET", "/cas/" + "A" * 64, 400, "not a SHA-256"),
        ("GET", "/blobs/" + "a" * 64, 400, "is not /[INSTANCE/]cas"),
        ("GET", "/", 400, "not valid"),
        ("GET", "/../cas/" + "a" * 64, 400, "not valid"),
        ("GET", "/x/./cas/" + "a" * 64, 400, "not valid"),
        ("GET", "//cas/" + "a" * 64, 400, "not valid"),
        ("GET", "/x%2F..%2F/cas/" + "a" * 64, 400, "not valid"),
        ("GET", "/ccache/team/zz", 400, "not a ccache entry"),
        ("GET", "/ccache/team/3b/abc", 400, "not a ccache entry"),
        ("POST", "/cas/" + "a" * 64, 405, "POST is not served"),
        ("DELETE", "/ac/" + "a" * 64, 405, "DELETE is not served"),
    ],
)
def test_bad_requests_get_a_clear_4xx(
    client: HttpClient, method: str, path: str, status: int, says: str
) -> None:
    reply = client.request(method, path)
    assert reply.status == status, reply.text
    assert says in reply.text
    assert reply.text.count("\n") == 1 and "Traceback" not in reply.text


def test_bad_puts_store_nothing(client: HttpClient, reapi: Reapi) -> None:
    data = os.urandom(1000)
    wrong = sha256(b"something else")
    reply = client.put(f"/cas/{wrong}", data)
    assert reply.status == 400 and "not stored" in reply.text
    assert client.head(f"/cas/{wrong}").status == 404
    assert client.head(f"/cas/{sha256(data)}").status == 404
    assert reapi.missing(digest(data)) == [digest(data)]
    # The same for a blob large enough to stream into the store's writer.
    large = os.urandom(3 << 20)
    reply = client.put(f"/cas/{wrong}", large)
    assert reply.status == 400 and "not stored" in reply.text
    assert client.head(f"/cas/{wrong}").status == 404
    assert client.head(f"/cas/{sha256(large)}").status == 404

    # Not an ActionResult: refused, and the key stays empty.
    action = sha256(b"garbage action")
    reply = client.put(f"/ac/{action}", b"\xff\xff\xff not a protobuf")
    assert reply.status == 400 and "not a serialized ActionResult" in reply.text
    # An ActionResult naming a malformed digest is refused like UpdateActionResult.
    bad = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="x", digest=re_pb2.Digest(hash="zz", size_bytes=1))]
    )
    reply = client.put(f"/ac/{action}", bad.SerializeToString())
    assert reply.status == 400 and "bad digest" in reply.text
    assert client.get(f"/ac/{action}").status == 404
    with pytest.raises(grpc.RpcError) as err:
        reapi.ac.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=re_pb2.Digest(hash=action, size_bytes=1))
        )
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_a_body_cut_short_stores_nothing(served: ServerProcess, client: HttpClient) -> None:
    data = os.urandom(100_000)
    url = urllib.parse.urlsplit(http_url(served))
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(
            f"PUT /cas/{sha256(data)} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[:50_000]
        )
    # The server is still fine, and the half blob is nowhere.
    assert client.head(f"/cas/{sha256(data)}").status == 404
    assert client.put(f"/cas/{sha256(data)}", data).status == 200


def test_ccache_layouts_and_methods(client: HttpClient) -> None:
    entry = os.urandom(1500)
    assert client.get(CC_SUBDIRS).status == 404
    assert client.put(CC_SUBDIRS, entry).status == 200
    assert client.get(CC_SUBDIRS).body == entry
    assert client.head(CC_SUBDIRS).status == 200
    # subdirs and flat name one entry; another NAME is another entry.
    assert client.get(CC_FLAT).body == entry
    assert client.get(f"/ccache/other/{CC_KEY}").status == 404
    # PUT overwrites.
    newer = os.urandom(900)
    assert client.put(CC_FLAT, newer).status == 200
    assert client.get(CC_SUBDIRS).body == newer
    # The bazel layout's ac/ path is a ccache entry, not an action result.
    assert client.put(CC_BAZEL, entry).status == 200
    assert client.get(CC_BAZEL).body == entry
    assert client.get("/ccache/team/ac/" + CC_BAZEL.rsplit("/", 1)[1]).body == entry
    assert client.get("/team/ac/" + CC_BAZEL.rsplit("/", 1)[1]).status == 404
    # The content went into the CAS (deduplicated, verified) under its own hash.
    assert client.get(f"/cas/{sha256(entry)}").body == entry
    assert client.request("DELETE", CC_SUBDIRS).status == 200
    assert client.get(CC_FLAT).status == 404
    assert client.head(CC_FLAT).status == 404
    # A large entry is spooled (its hash is not known up front), then streamed back.
    large = os.urandom(3 << 20)
    assert client.put(CC_FLAT, large).status == 200
    assert client.put(CC_FLAT, iter([large[:1000], large[1000:]])).status == 200  # chunked
    assert client.get(CC_SUBDIRS).body == large


def test_http_requests_are_counted(served: ServerProcess, client: HttpClient) -> None:
    data = os.urandom(64)
    client.get(f"/cas/{sha256(data)}")
    client.put(f"/cas/{sha256(data)}", data)
    client.get(f"/cas/{sha256(data)}")
    samples = scrape(metrics_url(served))
    ok = samples[
        ("slipstream_http_requests_total", (("code", "200"), ("method", "GET"), ("route", "cas")))
    ]
    assert ok >= 1
    lookups = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "slipstream_cache_lookups_total"
    }
    assert lookups[(("result", "hit"), ("service", "http_cas"))] >= 1
    assert lookups[(("result", "miss"), ("service", "http_cas"))] >= 1


# ---- servers of their own ----
READER = Token("reader", "tok-http-reader-0a1b", ("read",))
UPLOADER = Token("uploader", "tok-http-uploader-2c3d", ("read", "cas-write"))
TRUSTED = Token("trusted", "tok-http-trusted-4e5f", ("read", "cas-write", "ac-write"))


def test_tokens_and_scopes(tmp_path: pathlib.Path) -> None:
    tokens = write_token_file(tmp_path / "tokens.toml", [READER, UPLOADER, TRUSTED])
    audit = tmp_path / "audit.jsonl"
    args = ["--token-file", str(tokens), "--audit-log", str(audit)]
    server = http_server(tmp_path / "store", args)
    blob = os.urandom(300)
    cas = f"/cas/{sha256(blob)}"
    ac = f"/ac/{sha256(b'an action')}"
    result = re_pb2.ActionResult(exit_code=3).SerializeToString()
    with running(server):
        url = http_url(server)
        with HttpClient(url) as anonymous:
            reply = anonymous.get(cas)
            assert reply.status == 401 and "needs a token" in reply.text
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        with HttpClient(url, token="not-a-known-token") as stranger:
            assert stranger.get(cas).status == 401
        with HttpClient(url, token=READER.value) as reader:
            assert reader.get(cas).status == 404
            reply = reader.put(cas, blob)
            assert reply.status == 403 and "'cas-write'" in reply.text
        with HttpClient(url, token=UPLOADER.value) as uploader:
            assert uploader.put(cas, blob).status == 200
            reply = uploader.put(ac, result)
            assert reply.status == 403 and "'ac-write'" in reply.text
            reply = uploader.put(CC_SUBDIRS, blob)  # a ccache key is taken on trust
            assert reply.status == 403 and "'ac-write'" in reply.text
        with HttpClient(url, token=TRUSTED.value) as trusted:
            assert trusted.put(ac, result).status == 200
            assert trusted.put(CC_SUBDIRS, blob).status == 200
        with HttpClient(url, token=READER.value) as reader:
            assert reader.get(cas).body == blob
            assert reader.get(ac).body == result
            assert reader.get(CC_SUBDIRS).body == blob
        # ccache's http://user:TOKEN@host form: HTTP Basic with the token as password.
        with HttpClient(url) as basic:
            creds = base64.b64encode(f"ccache:{READER.value}".encode()).decode()
            reply = basic.request("GET", cas, headers={"Authorization": f"Basic {creds}"})
            assert reply.status == 200 and reply.body == blob
            reply = basic.request("GET", cas, headers={"Authorization": "Basic !!"})
            assert reply.status == 401
        # The same token works over gRPC, of course.
        with channel_for(server, READER.value) as ch:
            assert Reapi(ch).read(digest(blob)) == blob
    # Writes that are taken on trust are audited, refused ones too; tokens never appear.
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    seen = {(r["event"], r["caller"], r["outcome"]) for r in lines}
    assert ("ac_write", "trusted", "OK") in seen
    assert ("ccache_put", "trusted", "OK") in seen
    assert ("ac_write", "uploader", "HTTP 403") in seen
    assert ("ccache_put", "uploader", "HTTP 403") in seen
    assert all(r["protocol"] == "http" for r in lines)
    assert TRUSTED.value not in audit.read_text()


def test_read_only_ac_and_the_blob_size_limit(tmp_path: pathlib.Path) -> None:
    server = http_server(tmp_path / "store", ["--read-only-ac", "--max-blob-size", "10K"])
    blob = os.urandom(200)
    big = os.urandom(20_000)
    with running(server), HttpClient(http_url(server)) as client:
        assert client.put(f"/cas/{sha256(blob)}", blob).status == 200
        reply = client.put(f"/ac/{sha256(b'a')}", b"")
        assert reply.status == 403 and "disabled" in reply.text
        assert client.put(CC_SUBDIRS, blob).status == 403
        for body in (big, iter([big])):  # with Content-Length, and chunked
            reply = client.put(f"/cas/{sha256(big)}", body)
            assert reply.status == 413 and "10,240-byte limit" in reply.text
        assert client.head(f"/cas/{sha256(big)}").status == 404


def test_ccache_entries_obey_the_size_bound_and_lru(tmp_path: pathlib.Path) -> None:
    server = http_server(tmp_path / "store", ["--max-size", "1M"])
    alphabet = "0123456789abcdefghijklmnopqrstuv"

    def key_path(i: int) -> str:
        rest = "".join(alphabet[(i >> (5 * k)) & 31] for k in range(31))
        return f"/ccache/{i % 256:02x}/{rest}"

    entries = {i: os.urandom(100_000) for i in range(30)}  # 3 MB through a 1 MB store
    with running(server), HttpClient(http_url(server)) as client:
        for i, entry in entries.items():
            assert client.put(key_path(i), entry).status == 200
            # Entry 0 is read after every write: the most recently used, so never evicted.
            assert client.get(key_path(0)).body == entries[0], i
        present = [i for i in entries if client.head(key_path(i)).status == 200]
        assert 0 in present
        assert len(present) <= 10, present  # 10 x 100 KB is the bound already
        assert present[-1] == 29 and 1 not in present
        for i in present:
            assert client.get(key_path(i)).body == entries[i]
        # An entry larger than the whole bound cannot be stored at all.
        reply = client.put(key_path(99), os.urandom(2 << 20))
        assert reply.status == 413 and "do not fit" in reply.text
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and "tmp" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= 1 << 20


def test_https_with_the_servers_certificate_and_mutual_tls(tmp_path: pathlib.Path) -> None:
    pki = make_pki(tmp_path / "pki")
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    mtls = [*args, "--tls-client-ca", str(pki.ca)]
    blob = os.urandom(100)
    server = ServerProcess(
        tmp_path / "store",
        ["--http-listen", "127.0.0.1:0", *mtls],
        credentials=pki.channel_credentials(client=True),
    )
    with running(server):
        url = urllib.parse.urlsplit(http_url(server))
        assert url.scheme == "https" and url.port is not None

        def put(context: ssl.SSLContext) -> int:
            conn = http.client.HTTPSConnection("127.0.0.1", url.port, context=context, timeout=10)
            try:
                conn.request("PUT", f"/cas/{sha256(blob)}", body=blob)
                return conn.getresponse().status
            finally:
                conn.close()

        with_cert = ssl.create_default_context(cafile=str(pki.ca))
        with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert put(with_cert) == 200
        without_cert = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            put(without_cert)


def test_http_listen_comes_from_the_environment_and_is_checked(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(tmp_path / "store", env={"SLIPSTREAM_HTTP_LISTEN": "127.0.0.1:0"})
    with running(server), HttpClient(http_url(server)) as client:
        assert client.get(f"/cas/{sha256(b'')}").status == 200
    bad = serve_exit("--http-listen", "nonsense")
    assert bad.returncode == 2 and "--http-listen 'nonsense' is not HOST:PORT" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--listen", "127.0.0.1:0", "--storage", str(tmp_path / "store")]
        busy = subprocess.run(
            [sys.executable, "-m", "slipstream.cli", *argv, "--http-listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert busy.returncode == 2 and "cannot serve HTTP on" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr
