"""The OCI Distribution API at /v2/ over plain HTTP: every route, every bad input, every scope.

A real server process with a token file; requests by http.client. Errors come in the
spec's format ({"errors": [{"code": ..., "message": ...}]}) and store nothing.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import hashlib
import json
import os
import pathlib
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.http.helpers import HttpClient, Reply, http_server
from tests.ops.helpers import Token, metrics_url, write_token_file
from tests.support.oci import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, sha256
from tests.support.proc_stats import peak_rss_bytes
from tests.support.server_process import ServerProcess, http_url, running

WRITER = Token("ci-main", "tok-oci-writer-1f2e", ("read", "cas-write", "ac-write"))
PUSHER = Token("ci-pr", "tok-oci-pusher-3c4d", ("read", "cas-write"))
READER = Token("dev", "tok-oci-reader-5e6f", ("read",))
OTHER = Token("ci-other", "tok-oci-other-7a8b", ("read", "cas-write", "ac-write"))
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("oci")
    tokens = write_token_file(root / "tokens.toml", [WRITER, PUSHER, READER, OTHER])
    with running(http_server(root / "store", ["--token-file", str(tokens)])) as proc:
        yield proc


@pytest.fixture
def writer(server: ServerProcess) -> Iterator[HttpClient]:
    with HttpClient(http_url(server), token=WRITER.value) as client:
        yield client


def client(server: ServerProcess, token: Token | None) -> HttpClient:
    return HttpClient(http_url(server), token=token.value if token else None)


def error_code(reply: Reply) -> str:
    errors = json.loads(reply.body)["errors"]
    assert len(errors) == 1 and errors[0]["message"], reply
    code: str = errors[0]["code"]
    return code


def digest(data: bytes) -> str:
    return f"sha256:{sha256(data)}"


def push_blob(http: HttpClient, repo: str, data: bytes) -> Reply:
    """A monolithic upload: POST ?digest= with the body."""
    return http.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest(data)}", data)


def manifest_of(config: bytes, layers: list[bytes], media_type: str = OCI_MANIFEST) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": OCI_CONFIG, "digest": digest(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": digest(x), "size": len(x)} for x in layers
            ],
        }
    ).encode()


def put_manifest(
    http: HttpClient, repo: str, ref: str, data: bytes, media_type: str = OCI_MANIFEST
) -> Reply:
    return http.put(f"/v2/{repo}/manifests/{ref}", data, **{"Content-Type": media_type})


def test_base_route_answers_200_with_a_token_and_a_challenge_without(server: ServerProcess) -> None:
    with client(server, READER) as http:
        assert http.get("/v2/").status == 200
        assert http.get("/v2").status == 200
    with client(server, None) as anonymous:
        reply = anonymous.get("/v2/")
        assert reply.status == 401
        assert error_code(reply) == "UNAUTHORIZED"
        challenge = reply.headers["WWW-Authenticate"]
        assert challenge.startswith(f'Bearer realm="{http_url(server)}/v2/token"'), challenge


def test_the_token_endpoint_gives_back_the_basic_password_as_a_bearer_token(
    server: ServerProcess,
) -> None:
    with client(server, None) as http:
        basic = base64.b64encode(f"anyone:{READER.value}".encode()).decode()
        reply = http.request(
            "GET", "/v2/token?service=slipstream", headers={"Authorization": f"Basic {basic}"}
        )
        assert reply.status == 200, reply
        token = json.loads(reply.body)["token"]
        assert token == READER.value
        bad = base64.b64encode(b"anyone:not-a-token").decode()
        reply = http.request("GET", "/v2/token", headers={"Authorization": f"Basic {bad}"})
        assert reply.status == 401 and error_code(reply) == "UNAUTHORIZED"


def test_chunked_upload_then_pull_with_range(writer: HttpClient) -> None:
    data = bytes(range(256)) * 5000  # 1.28 MB
    start = writer.request("POST", "/v2/team/app/blobs/uploads/", b"")
    assert start.status == 202, start
    location = start.headers["Location"]
    uuid = start.headers["Docker-Upload-UUID"]
    assert location == f"/v2/team/app/blobs/uploads/{uuid}"
    first, second = data[:700_000], data[700_000:]
    reply = writer.request(
        "PATCH",
        location,
        first,
        {"Content-Range": f"0-{len(first) - 1}", "Content-Type": "application/octet-stream"},
    )
    assert reply.status == 202 and reply.headers["Range"] == f"0-{len(first) - 1}", reply
    status = writer.get(location)
    assert status.status == 204 and status.headers["Range"] == f"0-{len(first) - 1}"
    # Out of order: refused, nothing lost.
    reply = writer.request("PATCH", location, b"xx", {"Content-Range": "5-6"})
    assert reply.status == 416 and error_code(reply) == "BLOB_UPLOAD_INVALID"
    writer.close()
    # Not visible before it is finished.
    assert writer.head(f"/v2/team/app/blobs/{digest(data)}").status == 404
    reply = writer.request(
        "PATCH", location, second, {"Content-Range": f"{len(first)}-{len(data) - 1}"}
    )
    assert reply.status == 202, reply
    reply = writer.put(f"{location}?digest={digest(data)}", b"")
    assert reply.status == 201, reply
    assert reply.headers["Docker-Content-Digest"] == digest(data)
    assert reply.headers["Location"] == f"/v2/team/app/blobs/{digest(data)}"
    assert writer.get(location).status == 404  # the session is over
    got = writer.get(f"/v2/team/app/blobs/{digest(data)}")
    assert got.status == 200 and got.body == data
    assert got.headers["Docker-Content-Digest"] == digest(data)
    head = writer.head(f"/v2/team/app/blobs/{digest(data)}")
    assert head.status == 200 and head.headers["Content-Length"] == str(len(data))
    part = writer.request(
        "GET", f"/v2/team/app/blobs/{digest(data)}", headers={"Range": "bytes=1048570-1048579"}
    )
    assert part.status == 206 and part.body == data[1048570:1048580]
    assert part.headers["Content-Range"] == f"bytes 1048570-1048579/{len(data)}"
    tail = writer.request(
        "GET", f"/v2/team/app/blobs/{digest(data)}", headers={"Range": "bytes=-5"}
    )
    assert tail.status == 206 and tail.body == data[-5:]
    past = writer.request(
        "GET", f"/v2/team/app/blobs/{digest(data)}", headers={"Range": f"bytes={len(data)}-"}
    )
    assert past.status == 416 and error_code(past) == "RANGE_INVALID"
    # The same blob, by its hash, at the Bazel cache's /cas/.
    assert writer.get(f"/cas/{sha256(data)}").body == data


def test_an_upload_with_the_wrong_digest_is_refused_and_stores_nothing(writer: HttpClient) -> None:
    data, claimed = b"the real content", b"something else"
    reply = writer.request("POST", f"/v2/team/app/blobs/uploads/?digest={digest(claimed)}", data)
    assert reply.status == 400 and error_code(reply) == "DIGEST_INVALID", reply
    writer.close()
    assert writer.head(f"/v2/team/app/blobs/{digest(claimed)}").status == 404
    start = writer.request("POST", "/v2/team/app/blobs/uploads/", b"")
    reply = writer.put(f"{start.headers['Location']}?digest={digest(claimed)}", b"other bytes")
    assert reply.status == 400 and error_code(reply) == "DIGEST_INVALID", reply
    writer.close()
    assert writer.head(f"/v2/team/app/blobs/{digest(claimed)}").status == 404
    assert writer.head(f"/v2/team/app/blobs/{digest(b'other bytes')}").status == 404
    for bad in ("sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64, "nonsense"):
        reply = writer.get(f"/v2/team/app/blobs/{bad}")
        assert reply.status == 400 and error_code(reply) == "DIGEST_INVALID", (bad, reply)


def test_bad_repository_names_are_refused(writer: HttpClient) -> None:
    blob = digest(b"x")
    for path in (
        f"/v2/team/../app/blobs/{blob}",
        f"/v2/../blobs/{blob}",
        f"/v2/Team/app/blobs/{blob}",
        f"/v2/team%2Fapp/blobs/{blob}",
        f"/v2/team//app/blobs/{blob}",
        f"/v2/-team/blobs/{blob}",
        "/v2/team/./app/manifests/latest",
    ):
        reply = writer.get(path)
        assert reply.status == 400 and error_code(reply) == "NAME_INVALID", (path, reply)


def test_upload_sessions_of_another_caller_or_made_up_are_unknown(
    server: ServerProcess, writer: HttpClient
) -> None:
    start = writer.request("POST", "/v2/team/app/blobs/uploads/", b"")
    location = start.headers["Location"]
    with client(server, OTHER) as other:
        for method in ("GET", "PATCH", "PUT", "DELETE"):
            reply = other.request(method, f"{location}?digest={digest(b'')}", b"")
            assert reply.status == 404 and error_code(reply) == "BLOB_UPLOAD_UNKNOWN", (
                method,
                reply,
            )
    # Another repository's path to the same session: unknown too.
    other_repo = location.replace("/team/app/", "/team/other/")
    assert error_code(writer.get(other_repo)) == "BLOB_UPLOAD_UNKNOWN"
    for made_up in ("0" * 32, "not-a-session"):
        reply = writer.get(f"/v2/team/app/blobs/uploads/{made_up}")
        assert reply.status == 404 and error_code(reply) == "BLOB_UPLOAD_UNKNOWN"
    assert writer.get(location).status == 204  # still the owner's
    assert writer.request("DELETE", location).status == 204
    assert writer.get(location).status == 404


def test_a_caller_with_too_many_sessions_loses_its_oldest(server: ServerProcess) -> None:
    from slipstream.cache_server.services.oci_sessions import MAX_SESSIONS_PER_CALLER

    with client(server, PUSHER) as http:
        locations = [
            http.request("POST", "/v2/many/blobs/uploads/", b"").headers["Location"]
            for _ in range(MAX_SESSIONS_PER_CALLER + 1)
        ]
        assert http.get(locations[0]).status == 404
        assert all(http.get(loc).status == 204 for loc in locations[1:])
        for loc in locations[1:]:
            http.request("DELETE", loc)


def test_cross_repository_mount(writer: HttpClient) -> None:
    data = b"a layer pushed to one repository"
    assert push_blob(writer, "team/one", data).status == 201
    reply = writer.request(
        "POST", f"/v2/team/two/blobs/uploads/?mount={digest(data)}&from=team/one", b""
    )
    assert reply.status == 201 and reply.headers["Location"] == f"/v2/team/two/blobs/{digest(data)}"
    absent = digest(b"never pushed")
    reply = writer.request("POST", f"/v2/team/two/blobs/uploads/?mount={absent}&from=team/one", b"")
    assert reply.status == 202 and reply.headers["Docker-Upload-UUID"]
    writer.request("DELETE", reply.headers["Location"])


def test_manifests_by_tag_and_digest_with_content_negotiation(writer: HttpClient) -> None:
    config, layer = b'{"os":"linux"}', b"layer one"
    for blob in (config, layer):
        assert push_blob(writer, "shop/api", blob).status == 201
    for media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        manifest = manifest_of(config, [layer], media_type)
        reply = put_manifest(writer, "shop/api", "v1", manifest, media_type)
        assert reply.status == 201, reply
        assert reply.headers["Docker-Content-Digest"] == digest(manifest)
        for ref in ("v1", digest(manifest)):
            got = writer.request(
                "GET", f"/v2/shop/api/manifests/{ref}", headers={"Accept": media_type}
            )
            assert got.status == 200 and got.body == manifest
            assert got.headers["Content-Type"] == media_type
            assert got.headers["Docker-Content-Digest"] == digest(manifest)
            head = writer.request(
                "HEAD", f"/v2/shop/api/manifests/{ref}", headers={"Accept": media_type}
            )
            assert head.status == 200 and head.headers["Content-Length"] == str(len(manifest))
    # An index of the image manifest.
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": DOCKER_MANIFEST, "digest": digest(manifest), "size": len(manifest)}
            ],
        }
    ).encode()
    assert put_manifest(writer, "shop/api", "multi", index, OCI_INDEX).status == 201
    got = writer.request(
        "GET", "/v2/shop/api/manifests/multi", headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
    )
    assert got.status == 200 and got.body == index
    refused = writer.request(
        "GET", "/v2/shop/api/manifests/multi", headers={"Accept": OCI_MANIFEST}
    )
    assert refused.status == 404 and error_code(refused) == "MANIFEST_UNKNOWN"
    # By digest in a path: the body must hash to it.
    assert (
        error_code(put_manifest(writer, "shop/api", digest(b"other"), index, OCI_INDEX))
        == "DIGEST_INVALID"
    )
    assert put_manifest(writer, "shop/api", digest(index), index, OCI_INDEX).status == 201


def test_a_manifest_naming_a_missing_blob_is_refused(writer: HttpClient) -> None:
    config, layer = b'{"os":"linux","n":2}', b"layer two"
    assert push_blob(writer, "shop/web", config).status == 201
    manifest = manifest_of(config, [layer])
    reply = put_manifest(writer, "shop/web", "v1", manifest)
    assert reply.status == 400 and error_code(reply) == "MANIFEST_BLOB_UNKNOWN", reply
    assert writer.get("/v2/shop/web/manifests/v1").status == 404
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": digest(manifest), "size": len(manifest)}
            ],
        }
    ).encode()
    reply = put_manifest(writer, "shop/web", "multi", index, OCI_INDEX)
    assert reply.status == 400 and error_code(reply) == "MANIFEST_BLOB_UNKNOWN", reply
    assert push_blob(writer, "shop/web", layer).status == 201
    assert put_manifest(writer, "shop/web", "v1", manifest).status == 201
    assert put_manifest(writer, "shop/web", "multi", index, OCI_INDEX).status == 201


def test_invalid_and_oversized_manifests_are_refused(writer: HttpClient) -> None:
    for body, media_type in (
        (b"not json", OCI_MANIFEST),
        (b"[1, 2]", OCI_MANIFEST),
        (json.dumps({"schemaVersion": 1}).encode(), OCI_MANIFEST),
        (
            json.dumps({"schemaVersion": 2, "mediaType": "application/x-other"}).encode(),
            OCI_MANIFEST,
        ),
        (
            json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": "x"}).encode(),
            OCI_MANIFEST,
        ),
        (json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode(), OCI_MANIFEST),
    ):
        reply = put_manifest(writer, "shop/bad", "v1", body, media_type)
        assert reply.status == 400 and error_code(reply) == "MANIFEST_INVALID", (body, reply)
    reply = put_manifest(writer, "shop/bad", "v1", b" " * (5 << 20))
    assert reply.status == 413, reply
    writer.close()
    reply = put_manifest(writer, "shop/bad", "-bad", b"{}")
    assert reply.status == 400 and error_code(reply) == "TAG_INVALID", reply
    writer.close()
    assert writer.get("/v2/shop/bad/tags/list").status == 200
    assert json.loads(writer.get("/v2/shop/bad/tags/list").body)["tags"] == []


def test_tags_list_pages_and_deletes(writer: HttpClient) -> None:
    config = b'{"os":"linux","tags":1}'
    assert push_blob(writer, "shop/tags", config).status == 201
    manifest = manifest_of(config, [])
    tags = [f"t{i:02d}" for i in range(7)]
    for tag in tags:
        assert put_manifest(writer, "shop/tags", tag, manifest).status == 201
    listed = json.loads(writer.get("/v2/shop/tags/tags/list").body)
    assert listed == {"name": "shop/tags", "tags": tags}
    page = writer.get("/v2/shop/tags/tags/list?n=3")
    assert json.loads(page.body)["tags"] == tags[:3]
    assert page.headers["Link"] == '</v2/shop/tags/tags/list?n=3&last=t02>; rel="next"'
    page = writer.get("/v2/shop/tags/tags/list?n=3&last=t05")
    assert json.loads(page.body)["tags"] == ["t06"] and "Link" not in page.headers
    assert error_code(writer.get("/v2/shop/tags/tags/list?n=x")) == "PAGINATION_NUMBER_INVALID"
    assert writer.request("DELETE", "/v2/shop/tags/manifests/t00").status == 202
    assert writer.get("/v2/shop/tags/manifests/t00").status == 404
    assert writer.get("/v2/shop/tags/manifests/t01").status == 200
    assert writer.request("DELETE", f"/v2/shop/tags/manifests/{digest(manifest)}").status == 202
    assert writer.get("/v2/shop/tags/manifests/t01").status == 404
    assert json.loads(writer.get("/v2/shop/tags/tags/list").body)["tags"] == []
    reply = writer.request("DELETE", "/v2/shop/tags/manifests/t00")
    assert reply.status == 404 and error_code(reply) == "MANIFEST_UNKNOWN"


def test_blob_delete_is_not_served(writer: HttpClient) -> None:
    reply = writer.request("DELETE", f"/v2/team/app/blobs/{digest(b'x')}")
    assert reply.status == 405 and error_code(reply) == "UNSUPPORTED"


@pytest.mark.parametrize(
    ("method", "path", "token", "status"),
    [
        ("GET", "/v2/s/r/blobs/" + digest(b"scoped"), None, 401),
        ("GET", "/v2/s/r/blobs/" + digest(b"scoped"), READER, 200),
        ("HEAD", "/v2/s/r/blobs/" + digest(b"scoped"), READER, 200),
        ("POST", "/v2/s/r/blobs/uploads/", READER, 403),
        ("POST", "/v2/s/r/blobs/uploads/", PUSHER, 202),
        ("GET", "/v2/s/r/manifests/v1", None, 401),
        ("GET", "/v2/s/r/manifests/v1", READER, 200),
        ("PUT", "/v2/s/r/manifests/v2", READER, 403),
        ("PUT", "/v2/s/r/manifests/v2", PUSHER, 403),
        ("PUT", "/v2/s/r/manifests/v2", WRITER, 201),
        ("DELETE", "/v2/s/r/manifests/v2", PUSHER, 403),
        ("DELETE", "/v2/s/r/manifests/v2", WRITER, 202),
        ("GET", "/v2/s/r/tags/list", None, 401),
        ("GET", "/v2/s/r/tags/list", READER, 200),
        ("HEAD", "/v2/s/r/manifests/v1", READER, 200),
        ("HEAD", "/v2/s/r/manifests/v1", None, 401),
        ("GET", "/v2/s/r/blobs/uploads/" + "0" * 32, READER, 403),
        ("PATCH", "/v2/s/r/blobs/uploads/" + "0" * 32, READER, 403),
        ("PUT", "/v2/s/r/blobs/uploads/" + "0" * 32, READER, 403),
        ("DELETE", "/v2/s/r/blobs/uploads/" + "0" * 32, None, 401),
        ("GET", "/v2/s/r/blobs/uploads/" + "0" * 32, PUSHER, 404),
        ("GET", "/v2/s/r/referrers/" + digest(b"scoped"), None, 401),
        ("GET", "/v2/s/r/referrers/" + digest(b"scoped"), READER, 200),
        ("GET", "/v2/token", READER, 200),
        ("GET", "/v2/", READER, 200),
    ],
)
def test_scopes_of_every_route(
    server: ServerProcess,
    writer: HttpClient,
    method: str,
    path: str,
    token: Token | None,
    status: int,
) -> None:
    config = b"scoped"
    push_blob(writer, "s/r", config)
    manifest = manifest_of(config, [])
    put_manifest(writer, "s/r", "v1", manifest)
    body = manifest if method in ("PUT", "POST") else None
    if method == "POST":
        body = b""
    with client(server, token) as http:
        headers = {"Content-Type": OCI_MANIFEST} if method == "PUT" else {}
        reply = http.request(method, path, body, headers)
        assert reply.status == status, reply
        if status == 401:
            assert reply.headers["WWW-Authenticate"].startswith("Bearer realm=")
        if status >= 400 and method != "HEAD":
            assert error_code(reply) in ("UNAUTHORIZED", "DENIED", "BLOB_UPLOAD_UNKNOWN")


def test_a_tag_whose_blobs_were_evicted_answers_404(tmp_path: pathlib.Path) -> None:
    layer, config = b"L" * 2_500_000, b'{"os":"linux","evict":1}'
    store = tmp_path / "store"
    with (
        running(http_server(store, ["--max-size", "4M"])) as proc,
        HttpClient(http_url(proc)) as http,
    ):
        assert push_blob(http, "small/img", layer).status == 201  # the oldest entry
        assert push_blob(http, "small/img", config).status == 201
        assert put_manifest(http, "small/img", "v1", manifest_of(config, [layer])).status == 201
        assert http.head(f"/v2/small/img/blobs/{digest(config)}").status == 200  # refreshed
        assert push_blob(http, "small/other", b"F" * 2_000_000).status == 201  # evicts the layer
        assert http.head(f"/v2/small/img/blobs/{digest(layer)}").status == 404
        assert http.head(f"/v2/small/img/blobs/{digest(config)}").status == 200
        reply = http.get("/v2/small/img/manifests/v1")
        assert reply.status == 404 and error_code(reply) == "MANIFEST_UNKNOWN"


def test_with_anonymous_read_a_push_without_credentials_is_challenged(
    tmp_path: pathlib.Path,
) -> None:
    tokens = write_token_file(tmp_path / "tokens.toml", [WRITER])
    args = ["--token-file", str(tokens), "--anonymous", "read"]
    with running(http_server(tmp_path / "store", args)) as proc:
        with HttpClient(http_url(proc), token=WRITER.value) as http:
            assert push_blob(http, "open/app", b"public").status == 201
        with HttpClient(http_url(proc)) as anonymous:
            assert anonymous.get("/v2/").status == 200
            assert anonymous.get(f"/v2/open/app/blobs/{digest(b'public')}").body == b"public"
            reply = anonymous.request("POST", "/v2/open/app/blobs/uploads/", b"")
            assert reply.status == 401 and error_code(reply) == "UNAUTHORIZED", reply
            assert reply.headers["WWW-Authenticate"].startswith("Bearer realm=")


def test_a_delete_during_a_patch_waits_for_it(server: ServerProcess, writer: HttpClient) -> None:
    start = writer.request("POST", "/v2/team/app/blobs/uploads/", b"")
    location = start.headers["Location"]
    host, _, port = http_url(server).removeprefix("http://").rpartition(":")
    half = b"h" * 300_000
    with socket.create_connection((host, int(port)), timeout=30) as patch:
        patch.sendall(
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITER.value}\r\n"
            f"Content-Length: {2 * len(half)}\r\n\r\n".encode()
            + half
        )
        time.sleep(0.3)  # the PATCH holds the session, its body half read
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            deleting = pool.submit(lambda: client(server, WRITER).request("DELETE", location))
            time.sleep(0.3)
            assert not deleting.done()
            patch.sendall(half)
            answer = patch.recv(4096).split(b"\r\n", 1)[0]
            assert answer == b"HTTP/1.1 202 Accepted", answer
            assert deleting.result(timeout=10).status == 204
    assert writer.get(location).status == 404


def test_a_buildkit_cache_index_of_blobs_is_taken_when_they_are_present(
    writer: HttpClient,
) -> None:
    """BuildKit's `--cache-to type=registry` pushes an index whose entries are its cache
    config and layers (blobs, not manifests)."""
    cache_config, layer = b'{"layers":[],"records":[]}', b"a cached layer"

    def entry(media_type: str, data: bytes) -> dict[str, object]:
        return {"mediaType": media_type, "digest": digest(data), "size": len(data)}

    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                entry(OCI_LAYER, layer),
                entry("application/vnd.buildkit.cacheconfig.v0", cache_config),
            ],
        }
    ).encode()
    assert push_blob(writer, "cache/bk", cache_config).status == 201
    reply = put_manifest(writer, "cache/bk", "buildcache", index, OCI_INDEX)
    assert reply.status == 400 and error_code(reply) == "MANIFEST_BLOB_UNKNOWN", reply
    assert push_blob(writer, "cache/bk", layer).status == 201
    assert put_manifest(writer, "cache/bk", "buildcache", index, OCI_INDEX).status == 201
    got = writer.request("GET", "/v2/cache/bk/manifests/buildcache", headers={"Accept": OCI_INDEX})
    assert got.status == 200 and got.body == index


def test_referrers_of_a_manifest_are_listed_and_filtered(writer: HttpClient) -> None:
    config, empty = b'{"os":"linux","referred":1}', b"{}"
    for blob in (config, empty):
        assert push_blob(writer, "shop/ref", blob).status == 201
    image = manifest_of(config, [])
    assert put_manifest(writer, "shop/ref", "v1", image).status == 201
    sbom_type = "application/vnd.example.sbom.v1"
    artifact = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": sbom_type,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": digest(empty),
                "size": 2,
            },
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": digest(image), "size": len(image)},
            "annotations": {"org.example.kind": "sbom"},
        }
    ).encode()
    reply = put_manifest(writer, "shop/ref", digest(artifact), artifact)
    assert reply.status == 201 and reply.headers["OCI-Subject"] == digest(image), reply
    listed = writer.get(f"/v2/shop/ref/referrers/{digest(image)}")
    assert listed.status == 200 and listed.headers["Content-Type"] == OCI_INDEX
    assert json.loads(listed.body)["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": digest(artifact),
            "size": len(artifact),
            "artifactType": sbom_type,
            "annotations": {"org.example.kind": "sbom"},
        }
    ]
    filtered = writer.get(f"/v2/shop/ref/referrers/{digest(image)}?artifactType=other/type")
    assert json.loads(filtered.body)["manifests"] == []
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert (
        json.loads(writer.get(f"/v2/shop/other/referrers/{digest(image)}").body)["manifests"] == []
    )
    assert writer.request("DELETE", f"/v2/shop/ref/manifests/{digest(artifact)}").status == 202
    assert json.loads(writer.get(f"/v2/shop/ref/referrers/{digest(image)}").body)["manifests"] == []


def test_read_only_ac_refuses_manifest_writes_with_403_not_a_challenge(
    tmp_path: pathlib.Path,
) -> None:
    with (
        running(http_server(tmp_path / "store", ["--read-only-ac"])) as proc,
        HttpClient(http_url(proc)) as http,
    ):
        config = b'{"os":"linux","ro":1}'
        assert push_blob(http, "ro/app", config).status == 201  # blobs are still taken
        reply = put_manifest(http, "ro/app", "v1", manifest_of(config, []))
        assert reply.status == 403 and error_code(reply) == "DENIED", reply
        assert "WWW-Authenticate" not in reply.headers
        assert http.request("DELETE", "/v2/ro/app/manifests/v1").status == 403


def test_metrics_count_oci_requests_lookups_and_bytes(tmp_path: pathlib.Path) -> None:
    args = ["--metrics-listen", "127.0.0.1:0"]
    data = b"m" * 100_000
    with running(http_server(tmp_path / "store", args)) as proc, HttpClient(http_url(proc)) as http:
        assert push_blob(http, "m/app", data).status == 201
        assert http.get(f"/v2/m/app/blobs/{digest(data)}").status == 200
        assert http.head(f"/v2/m/app/blobs/{digest(b'absent')}").status == 404  # no body
        assert http.get("/v2/m/app/manifests/nothing").status == 404
        with urllib.request.urlopen(metrics_url(proc), timeout=10) as answer:
            text = answer.read().decode()
    for line in (
        'slipstream_http_requests_total{code="201",method="POST",route="oci_uploads"} 1.0',
        'slipstream_http_received_bytes_total{method="POST",route="oci_uploads"} 100000.0',
        'slipstream_http_sent_bytes_total{method="GET",route="oci_blobs"} 100000.0',
        'slipstream_cache_lookups_total{result="hit",service="oci_blobs"} 1.0',
        'slipstream_cache_lookups_total{result="miss",service="oci_blobs"} 1.0',
        'slipstream_http_requests_total{code="404",method="GET",route="oci_manifests"} 1.0',
    ):
        assert line in text, line


def test_a_64_mib_layer_is_pushed_in_chunks_and_pulled_without_holding_it_in_memory(
    server: ServerProcess, writer: HttpClient
) -> None:
    size, piece = 64 << 20, 1 << 20
    block = os.urandom(piece)
    data = block * (size // piece)
    assert server.proc is not None
    peak_rss = functools.partial(peak_rss_bytes, server.proc.pid)

    before = peak_rss()
    location = writer.request("POST", "/v2/big/app/blobs/uploads/", b"").headers["Location"]
    half = size // 2
    for start in (0, half):
        pieces = (data[i : i + piece] for i in range(start, start + half, piece))
        headers = {"Content-Range": f"{start}-{start + half - 1}", "Content-Length": str(half)}
        assert writer.request("PATCH", location, pieces, headers).status == 202
    assert writer.put(f"{location}?digest={digest(data)}", b"").status == 201
    writer.conn.request("GET", f"/v2/big/app/blobs/{digest(data)}", headers=writer.headers)
    answer = writer.conn.getresponse()
    assert answer.status == 200 and answer.getheader("Content-Length") == str(size)
    got = hashlib.sha256()
    while chunk := answer.read(piece):
        got.update(chunk)
    assert got.hexdigest() == sha256(data)
    # Neither the upload nor the download held the layer in the server's memory.
    assert peak_rss() - before < 32 << 20, (before, peak_rss())


def test_an_abandoned_upload_is_cleaned_up_with_its_file_without_another_request(
    tmp_path: pathlib.Path,
) -> None:
    args = ["--upload-idle-timeout", "1s"]
    with running(http_server(tmp_path / "store", args)) as proc, HttpClient(http_url(proc)) as http:
        assert proc.proc is not None
        fds = pathlib.Path(f"/proc/{proc.proc.pid}/fd")

        def spool_files() -> int:
            links = []
            for fd in fds.iterdir():
                try:
                    links.append(os.readlink(fd))
                except OSError:
                    continue  # closed meanwhile
            # Unlinked files in the temp dir (O_TMPFILE names them "#INODE (deleted)").
            return sum(
                link.startswith(tempfile.gettempdir()) and link.endswith("(deleted)")
                for link in links
            )

        before = spool_files()
        location = http.request("POST", "/v2/gone/app/blobs/uploads/", b"").headers["Location"]
        assert http.request("PATCH", location, b"x" * 200_000).status == 202  # spilled to a file
        assert spool_files() == before + 1
        deadline = time.monotonic() + 10
        while spool_files() > before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert spool_files() == before
        reply = http.get(location)
        assert reply.status == 404 and error_code(reply) == "BLOB_UPLOAD_UNKNOWN"


def test_manifest_writes_and_refusals_go_to_the_audit_log(tmp_path: pathlib.Path) -> None:
    tokens = write_token_file(tmp_path / "tokens.toml", [WRITER, PUSHER])
    audit = tmp_path / "audit.jsonl"
    args = ["--token-file", str(tokens), "--audit-log", str(audit)]
    with running(http_server(tmp_path / "store", args)) as proc:
        config = b'{"os":"linux","audited":1}'
        with client(proc, WRITER) as http:
            assert push_blob(http, "a/app", config).status == 201
            assert put_manifest(http, "a/app", "v1", manifest_of(config, [])).status == 201
            assert http.request("DELETE", "/v2/a/app/manifests/v1").status == 202
        with client(proc, PUSHER) as http:
            assert put_manifest(http, "a/app", "v2", manifest_of(config, [])).status == 403
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    seen = [(r["event"], r.get("caller"), r.get("reference"), r.get("status")) for r in records]
    assert [s[:3] for s in seen] == [
        ("oci_manifest_put", "ci-main", "v1"),
        ("oci_manifest_delete", "ci-main", "v1"),
        ("oci_manifest_put", "ci-pr", "v2"),
    ], records
    assert all(r["repository"] == "a/app" for r in records)
    assert WRITER.value not in audit.read_text() and PUSHER.value not in audit.read_text()
