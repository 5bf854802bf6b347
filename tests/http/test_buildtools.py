"""Build tools' own remote caches on the HTTP endpoint, at the protocol level.

Turborepo (/v8), Nx (/v1) and sccache's WebDAV (/sccache) against a real server
process: what each tool sends and expects back, teams as namespaces, one stored copy
of identical outputs, tokens and scopes, the audit log, metrics, --read-only-ac,
--max-blob-size, and bad input (a 4xx with one line, nothing stored). The real
tools drive the endpoint in test_turborepo.py, test_nx.py and test_sccache.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.http.helpers import HttpClient, Reply, http_server, sha256
from tests.ops.helpers import Token, channel_for, metrics_url, scrape, write_token_file
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, http_url, running

WRITER = Token("ci-tools", "tok-tools-writer-51aa", ("read", "cas-write", "ac-write"))
READER = Token("dev-tools", "tok-tools-reader-62bb", ("read",))
UPLOADER = Token("uploader", "tok-tools-uploader-73cc", ("read", "cas-write"))
TURBO_HASH = "6d8c5e418658a5da"
NX_HASH = "1423035109408402797"
SCCACHE_ENTRY = "/sccache/proj/d/f/0/" + sha256(b"an sccache key")


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, pathlib.Path]]:
    root = tmp_path_factory.mktemp("buildtools")
    tokens = write_token_file(root / "tokens.toml", [WRITER, READER, UPLOADER])
    audit = root / "audit.jsonl"
    args = [
        *("--token-file", str(tokens), "--audit-log", str(audit)),
        *("--max-blob-size", "64K", "--metrics-listen", "127.0.0.1:0"),
    ]
    with running(http_server(root / "store", args)) as proc:
        yield proc, audit


@pytest.fixture
def server(served: tuple[ServerProcess, pathlib.Path]) -> ServerProcess:
    return served[0]


@pytest.fixture
def writer(server: ServerProcess) -> Iterator[HttpClient]:
    with HttpClient(http_url(server), token=WRITER.value) as client:
        yield client


@pytest.fixture
def reader(server: ServerProcess) -> Iterator[HttpClient]:
    with HttpClient(http_url(server), token=READER.value) as client:
        yield client


def one_line(reply: Reply) -> bool:
    return reply.text.count("\n") == 1 and "Traceback" not in reply.text


# ---- Turborepo ----
def test_turborepo_artifacts_keep_duration_and_tag(writer: HttpClient, reader: HttpClient) -> None:
    data = os.urandom(5000)
    path = f"/v8/artifacts/{TURBO_HASH}?slug=web"
    assert reader.get(path).status == 404
    reply = writer.put(path, data, **{"x-artifact-duration": "1234", "x-artifact-tag": "c2ln+/="})
    assert reply.status == 202 and "urls" in json.loads(reply.body)
    got = reader.get(path)
    assert got.status == 200 and got.body == data
    assert got.headers["x-artifact-duration"] == "1234"
    assert got.headers["x-artifact-tag"] == "c2ln+/="
    head = reader.head(path)
    assert head.status == 200 and head.headers["Content-Length"] == str(len(data))
    assert head.headers["x-artifact-tag"] == "c2ln+/="

    # Which of these exist: POST /v8/artifacts.
    query = {"hashes": [TURBO_HASH, "0123456789abcdef"]}
    reply = reader.request("POST", "/v8/artifacts?slug=web", json.dumps(query).encode())
    assert reply.status == 200, reply.text
    answer = json.loads(reply.body)
    assert answer[TURBO_HASH] == {"size": 5000, "taskDurationMs": 1234, "tag": "c2ln+/="}
    assert "error" in answer["0123456789abcdef"]

    reply = reader.get("/v8/artifacts/status?slug=web")
    assert reply.status == 200 and json.loads(reply.body) == {"status": "enabled"}


def test_turborepo_teams_are_namespaces(writer: HttpClient, reader: HttpClient) -> None:
    data = b"team a's outputs"
    assert writer.put("/v8/artifacts/aaaa0001?teamId=team_a", data).status == 202
    assert reader.get("/v8/artifacts/aaaa0001?teamId=team_a").body == data
    for other in ("?teamId=team_b", "?slug=team_b", "", "?slug=team_a2"):
        reply = reader.get(f"/v8/artifacts/aaaa0001{other}")
        assert reply.status == 404, other
        assert reader.head(f"/v8/artifacts/aaaa0001{other}").status == 404
    body = json.dumps({"hashes": ["aaaa0001"]}).encode()
    reply = reader.request("POST", "/v8/artifacts?teamId=team_b", body)
    assert "error" in json.loads(reply.body)["aaaa0001"]
    # teamId wins over slug when both are given (turbo sends one).
    assert reader.get("/v8/artifacts/aaaa0001?teamId=team_a&slug=team_b").body == data


def test_lookups_and_turborepo_events_are_counted(
    server: ServerProcess, writer: HttpClient, reader: HttpClient
) -> None:
    def counted(result: str, service: str = "turborepo_events") -> float:
        samples = scrape(metrics_url(server))
        labels = (("result", result), ("service", service))
        return samples.get(("slipstream_cache_lookups_total", labels), 0.0)

    # Each tool's GETs are lookups of its own kind.
    for service, path in (
        ("turborepo", "/v8/artifacts/feed0001"),
        ("nx", "/v1/cache/880001"),
        ("sccache", "/sccache/proj/counted"),
    ):
        hits, misses = counted("hit", service), counted("miss", service)
        assert reader.get(path).status == 404
        assert writer.put(path, b"counted").status in (200, 201, 202)
        assert reader.get(path).status == 200
        assert (counted("hit", service), counted("miss", service)) == (hits + 1, misses + 1)

    hits, misses = counted("hit"), counted("miss")
    events = [
        {"sessionId": "s1", "source": "REMOTE", "event": "HIT", "hash": "ab12", "duration": 5},
        {"sessionId": "s1", "source": "LOCAL", "event": "HIT", "hash": "ab13", "duration": 7},
        {"sessionId": "s1", "source": "REMOTE", "event": "MISS", "hash": "ab14"},
    ]
    reply = reader.request("POST", "/v8/artifacts/events?slug=web", json.dumps(events).encode())
    assert reply.status == 200, reply.text
    assert counted("hit") == hits + 2 and counted("miss") == misses + 1
    reply = reader.request("POST", "/v8/artifacts/events", b'{"not": "a list"}')
    assert reply.status == 400 and one_line(reply)


# ---- Nx ----
def test_nx_put_get_and_no_overwrite(writer: HttpClient, reader: HttpClient) -> None:
    data = os.urandom(2000)
    path = f"/v1/cache/{NX_HASH}"
    assert reader.get(path).status == 404
    assert writer.put(path, data).status == 200
    assert reader.get(path).body == data
    reply = writer.put(path, b"something else")
    assert reply.status == 409 and one_line(reply)
    assert reader.get(path).body == data  # unchanged
    # Without a Content-Length (chunked): 400, as the OpenAPI says, and nothing stored.
    reply = writer.put("/v1/cache/777", iter([b"chunked"]))
    assert reply.status == 400 and "Content-Length" in reply.text
    assert reader.get("/v1/cache/777").status == 404


# ---- sccache (WebDAV) ----
def propfind(client: HttpClient, path: str, depth: str) -> Reply:
    return client.request("PROPFIND", path, b"", {"Depth": depth})


def test_sccache_webdav_levels_and_entries(writer: HttpClient, reader: HttpClient) -> None:
    root = propfind(reader, "/sccache/", "0")
    assert root.status == 207 and "<D:collection/>" in root.text
    assert propfind(reader, "/sccache/proj/", "0").status == 404
    # sccache (opendal) makes each missing level, then PUTs the entry.
    for level in (
        "/sccache/proj/",
        "/sccache/proj/d/",
        "/sccache/proj/d/f/",
        "/sccache/proj/d/f/0/",
    ):
        assert writer.request("MKCOL", level).status == 201, level
    assert writer.request("MKCOL", "/sccache/proj/d/").status == 405  # it exists
    assert reader.get(SCCACHE_ENTRY).status == 404
    data = os.urandom(3000)
    assert writer.put(SCCACHE_ENTRY, data).status == 201
    assert reader.get(SCCACHE_ENTRY).body == data
    assert reader.head(SCCACHE_ENTRY).headers["Content-Length"] == "3000"
    entry = propfind(reader, SCCACHE_ENTRY, "0")
    assert entry.status == 207 and "<D:getcontentlength>3000<" in entry.text
    listing = propfind(reader, "/sccache/proj/d/f/0", "1")
    assert listing.status == 207
    assert f"<D:href>{SCCACHE_ENTRY}</D:href>" in listing.text
    assert "<D:href>/sccache/proj/d/f/0/</D:href>" in listing.text
    top = propfind(reader, "/sccache/proj/", "1").text
    assert "<D:href>/sccache/proj/d/</D:href>" in top
    reply = propfind(reader, "/sccache/proj/", "infinity")
    assert reply.status == 403 and one_line(reply)
    assert writer.request("DELETE", SCCACHE_ENTRY).status == 204
    assert reader.get(SCCACHE_ENTRY).status == 404


# ---- one store ----
def test_identical_outputs_are_one_cas_blob(server: ServerProcess, writer: HttpClient) -> None:
    data = os.urandom(4000)
    assert writer.put("/v8/artifacts/beef0001?slug=web", data).status == 202
    assert writer.put("/v1/cache/90001", data).status == 200
    assert writer.put("/sccache/proj/same-output", data).status == 201
    # Each is the CAS blob of its bytes, stored once: readable over gRPC and over /cas.
    assert writer.get(f"/cas/{sha256(data)}").body == data
    with channel_for(server, WRITER.value) as ch:
        assert Reapi(ch).missing(digest(data)) == []
    copies = [p for p in pathlib.Path(server.storage).rglob(f"*{sha256(data)}*") if p.is_file()]
    assert len(copies) == 1, copies


# ---- tokens, scopes, audit ----
def test_scopes_and_the_audit_log(served: tuple[ServerProcess, pathlib.Path]) -> None:
    server, audit = served
    url = http_url(server)
    writes = [
        ("PUT", "/v8/artifacts/cafe0002?slug=web"),
        ("PUT", "/v1/cache/20002"),
        ("PUT", "/sccache/proj/scoped"),
        ("MKCOL", "/sccache/scoped/"),
    ]
    reads = [
        ("GET", "/v8/artifacts/cafe0002?slug=web"),
        ("GET", "/v1/cache/20002"),
        ("GET", "/sccache/proj/scoped"),
    ]
    with HttpClient(url) as anonymous:
        for method, path in reads + writes:
            reply = anonymous.request(method, path, b"x" if method == "PUT" else None)
            assert reply.status == 401, (method, path)
    for token in (READER, UPLOADER):  # a write needs ac-write too: the key is taken on trust
        with HttpClient(url, token=token.value) as client:
            for method, path in writes:
                reply = client.request(method, path, b"x" if method == "PUT" else None)
                assert reply.status == 403 and "'ac-write'" in reply.text, (token.name, path)
                if path.startswith("/v8"):  # as turbo reads an error: Vercel's JSON form
                    assert json.loads(reply.body)["error"]["code"] == "forbidden"
            for method, path in reads:
                assert client.request(method, path).status == 404
    with HttpClient(url, token=WRITER.value) as writer:
        for method, path in writes:
            reply = writer.request(method, path, b"x" if method == "PUT" else None)
            assert reply.status in (201, 202, 200), (path, reply.text)
    with HttpClient(url, token=READER.value) as reader:
        for method, path in reads:
            assert reader.request(method, path).body == b"x"
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    seen = {(r["event"], r["caller"], r["outcome"]) for r in lines}
    for event in ("turborepo_put", "nx_put", "sccache_put", "sccache_mkcol"):
        assert (event, WRITER.name, "OK") in seen, event
        assert (event, READER.name, "HTTP 403") in seen, event
    turbo = [r for r in lines if r["event"] == "turborepo_put" and r["hash"] == "cafe0002"]
    assert turbo and all(r["team"] == "web" for r in turbo)
    assert WRITER.value not in audit.read_text()


# ---- limits and bad input ----
@pytest.mark.parametrize(
    ("method", "path", "status", "says"),
    [
        ("GET", "/v8/artifacts/not-hex", 400, "not a Turborepo hash"),
        ("PUT", "/v8/artifacts/abcdefg", 400, "not a Turborepo hash"),
        ("PUT", "/v8/artifacts/" + "a" * 101, 400, "is not valid"),
        ("GET", "/v8/artifacts/abcd?teamId=a%20b", 400, "teamId and slug"),
        ("GET", "/v8/something", 404, "not a Turborepo remote cache path"),
        ("DELETE", "/v8/artifacts/abcd", 405, "DELETE is not served"),
        ("GET", "/v1/cache/12.34", 400, "not an Nx hash"),
        ("GET", "/v1/cache/12_34", 400, "not an Nx hash"),
        ("GET", "/v1/cache/" + "1" * 101, 400, "is not valid"),
        ("GET", "/v1/other/1234", 404, "not an Nx cache path"),
        ("DELETE", "/v1/cache/1234", 405, "DELETE is not served"),
        ("GET", "/sccache/proj/../etc/passwd", 400, "'..'"),
        ("PUT", "/sccache/proj/./x", 400, "'..'"),
        ("GET", "/sccache/a//b", 400, "no empty"),
        ("GET", "/sccache/" + "/".join("x" * 17), 400, "more than 16 levels"),
        ("GET", "/sccache/" + "/".join(["y" * 60] * 4), 400, "too long"),
        ("PUT", "/sccache/", 405, "root collection"),
        ("COPY", "/sccache/proj/x", 405, "COPY is not served"),
    ],
)
def test_bad_requests_get_a_clear_4xx(
    writer: HttpClient, method: str, path: str, status: int, says: str
) -> None:
    reply = writer.request(method, path, b"data" if method == "PUT" else None)
    assert reply.status == status, reply.text
    assert says in reply.text and one_line(reply)


def test_bad_puts_store_nothing(server: ServerProcess, writer: HttpClient) -> None:
    reply = writer.put("/v8/artifacts/dead0003", b"x", **{"x-artifact-duration": "soon"})
    assert reply.status == 400 and "x-artifact-duration" in reply.text and one_line(reply)
    reply = writer.put("/v8/artifacts/dead0003", b"x", **{"x-artifact-tag": "not base64!"})
    assert reply.status == 400 and "x-artifact-tag" in reply.text
    assert writer.get("/v8/artifacts/dead0003").status == 404
    for bad in (b"{", b'{"hashes": "abcd"}', b'{"hashes": ["zz"]}'):
        reply = writer.request("POST", "/v8/artifacts", bad)
        assert reply.status == 400 and one_line(reply), bad
    # Over --max-blob-size (64K): 413 before the body is read, and chunked too.
    big = os.urandom(70_000)
    for path, ok in (
        ("/v8/artifacts/dead0004", 202),
        ("/v1/cache/40004", 200),
        ("/sccache/proj/big", 201),
    ):
        reply = writer.put(path, big)
        assert reply.status == 413 and "65,536-byte limit" in reply.text, path
        if not path.startswith("/v1"):  # Nx refuses a PUT without a length anyway
            reply = writer.put(path, iter([big[:30_000], big[30_000:]]))
            assert reply.status == 413, path
        assert writer.get(path).status == 404
        assert writer.put(path, big[:1000]).status == ok  # and the server goes on
    # A body shorter than its Content-Length: nothing stored, the server goes on.
    url = urllib.parse.urlsplit(http_url(server))
    data = os.urandom(50_000)
    for path in ("/v8/artifacts/dead0005", "/v1/cache/50005", "/sccache/proj/cut"):
        with socket.create_connection((url.hostname, url.port), timeout=10) as s:
            s.sendall(
                f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITER.value}\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data[:20_000]
            )
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(4096)
        assert not answer or answer.startswith(b"HTTP/1.1 400"), answer
        assert writer.get(path).status == 404, path
    assert writer.head(f"/cas/{sha256(data[:20_000])}").status == 404


def test_read_only_ac_refuses_every_write(tmp_path: pathlib.Path) -> None:
    server = http_server(tmp_path / "store", ["--read-only-ac"])
    with running(server), HttpClient(http_url(server)) as client:
        for method, path in (
            ("PUT", "/v8/artifacts/abcd"),
            ("PUT", "/v1/cache/1234"),
            ("PUT", "/sccache/x/y"),
            ("MKCOL", "/sccache/x/"),
        ):
            reply = client.request(method, path, b"x" if method == "PUT" else None)
            assert reply.status == 403 and "--read-only-ac" in reply.text, path
        assert client.get("/v8/artifacts/abcd").status == 404


def test_entries_obey_the_size_bound_and_an_evicted_one_is_a_miss(tmp_path: pathlib.Path) -> None:
    server = http_server(tmp_path / "store", ["--max-size", "1M"])
    entries = {i: os.urandom(100_000) for i in range(24)}  # 2.4 MB through a 1 MB store
    with running(server), HttpClient(http_url(server)) as client:
        for i, data in entries.items():
            assert client.put(f"/v8/artifacts/{i:08x}", data).status == 202
            assert client.put(f"/v1/cache/{i}", data[:50_000]).status == 200
        present = [i for i in entries if client.head(f"/v8/artifacts/{i:08x}").status == 200]
        assert 0 not in present and 23 in present, present
        body = json.dumps({"hashes": [f"{i:08x}" for i in entries]}).encode()
        answer = json.loads(client.request("POST", "/v8/artifacts", body).body)
        assert [i for i in entries if "size" in answer[f"{i:08x}"]] == present
        assert client.get("/v1/cache/0").status == 404
        # An Nx hash whose entry was evicted may be stored again (no 409).
        assert client.put("/v1/cache/0", b"again").status == 200
        assert client.get("/v1/cache/0").body == b"again"


def test_a_store_in_memory_serves_entries_in_place(tmp_path: pathlib.Path) -> None:
    # memory:// works from memory: small steps run on the event loop (Backend.run_store).
    server = ServerProcess("memory://", ["--http-listen", "127.0.0.1:0"])
    small, large = os.urandom(3000), os.urandom(3 << 20)
    with running(server), HttpClient(http_url(server)) as client:
        for path, ok in (
            ("/v8/artifacts/abc{}", 202),
            ("/v1/cache/12{}", 200),
            ("/sccache/mem/x{}", 201),
        ):
            for n, data in enumerate((small, large)):
                entry = path.format(n)
                assert client.get(entry).status == 404
                assert client.put(entry, data, **{"x-artifact-duration": "7"}).status == ok
                assert client.get(entry).body == data
                if not entry.startswith("/v1"):  # Nx's API has no HEAD
                    assert client.head(entry).headers["Content-Length"] == str(len(data))
        assert client.get("/v8/artifacts/abc1").headers["x-artifact-duration"] == "7"
        # A large body cut short (spooled, not read whole): nothing stored.
        url = urllib.parse.urlsplit(http_url(server))
        for path in ("/v8/artifacts/c0700001", "/v1/cache/991", "/sccache/mem/cut"):
            with socket.create_connection((url.hostname, url.port), timeout=10) as s:
                head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(large)}\r\n\r\n"
                s.sendall(head.encode() + large[: 2 << 20])
                s.shutdown(socket.SHUT_WR)
                answer = s.recv(4096)
            assert not answer or answer.startswith(b"HTTP/1.1 400"), answer
            assert client.get(path).status == 404, path
        assert client.head(f"/cas/{sha256(large[: 2 << 20])}").status == 404
