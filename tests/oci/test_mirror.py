"""End-to-end: the registry as a pull-through mirror of Debian's docker-registry.

Images are pushed to the upstream with skopeo; pulls go through Slipstream
(`--registry-upstream`), fetch what the store lacks once, and keep working by tag
and by digest once the upstream is stopped. An image never seen fails fast with a
clear error; a tag is asked for again after its TTL; many runners asking for one
blob at once make one upstream fetch.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from slipstream.cache_server.services.oci_upstream import AUTH_ENV
from tests.http.helpers import HttpClient, http_server
from tests.ops.helpers import Token, write_token_file
from tests.support.oci import (
    DOCKER_REGISTRY,
    SKOPEO,
    Image,
    UpstreamRegistry,
    random_layers,
    sha256,
    skopeo,
    write_image,
)
from tests.support.server_process import ServerProcess, http_url, running

pytestmark = pytest.mark.skipif(
    SKOPEO is None or DOCKER_REGISTRY is None,
    reason="needs skopeo and docker-registry (Debian packages; CI installs them)",
)


@pytest.fixture
def upstream(tmp_path: pathlib.Path) -> Iterator[UpstreamRegistry]:
    registry = UpstreamRegistry(tmp_path / "upstream").start()
    try:
        yield registry
    finally:
        registry.stop()


def push_upstream(upstream: UpstreamRegistry, image: Image, ref: str) -> None:
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{image.layout}:latest",
        f"docker://{upstream.address}/{ref}",
    )


def pull(server: ServerProcess, ref: str, dest: pathlib.Path) -> dict[str, bytes]:
    """skopeo copy through the mirror into an OCI layout; every blob verified."""
    registry = http_url(server).removeprefix("http://")
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry}/{ref}", f"oci:{dest}:x")
    blobs = {}
    for path in (dest / "blobs" / "sha256").iterdir():
        data = path.read_bytes()
        assert sha256(data) == path.name
        blobs[f"sha256:{path.name}"] = data
    return blobs


def test_pulls_through_the_mirror_keep_working_with_the_upstream_stopped(
    upstream: UpstreamRegistry, tmp_path: pathlib.Path
) -> None:
    image = write_image(tmp_path / "image", random_layers(3, [1_200_000, 5_000]))
    push_upstream(upstream, image, "lib/app:v1")
    args = ["--registry-upstream", f"http://{upstream.address}", "--registry-tag-ttl", "0"]
    with running(http_server(tmp_path / "store", args)) as server:
        assert image.blobs().items() <= pull(server, "lib/app:v1", tmp_path / "a").items()
        with HttpClient(http_url(server)) as http:  # the layer is a CAS blob now
            assert http.get(f"/cas/{sha256(image.layers[0])}").body == image.layers[0]
        fetched = upstream.requests(
            "GET", f"/v2/lib/app/blobs/sha256:{sha256(image.layers[0])}", 200
        )
        assert fetched == 1
        pull(server, "lib/app:v1", tmp_path / "b")  # from the store: the upstream is not asked
        assert (
            upstream.requests("GET", f"/v2/lib/app/blobs/sha256:{sha256(image.layers[0])}", 200)
            == 1
        )

        upstream.stop()
        by_tag = pull(server, "lib/app:v1", tmp_path / "c")  # the TTL is over: served stale
        assert image.blobs().items() <= by_tag.items()
        by_digest = pull(server, f"lib/app@{image.manifest_digest}", tmp_path / "d")
        assert image.blobs().items() <= by_digest.items()
        registry = http_url(server).removeprefix("http://")
        started = time.monotonic()
        never = skopeo(
            "inspect", "--tls-verify=false", f"docker://{registry}/lib/never:v1", check=False
        )
        assert time.monotonic() - started < 10
        assert never.returncode != 0
        assert "is not cached here; upstream" in never.stderr and "unavailable" in never.stderr


def test_a_tag_is_asked_for_again_after_its_ttl_and_a_prefix_maps_repositories(
    upstream: UpstreamRegistry, tmp_path: pathlib.Path
) -> None:
    first = write_image(tmp_path / "first", random_layers(4, [2_000]))
    second = write_image(tmp_path / "second", random_layers(5, [3_000]))
    push_upstream(upstream, first, "lib/app:v1")
    args = ["--registry-upstream", f"hub=http://{upstream.address}", "--registry-tag-ttl", "0"]
    with running(http_server(tmp_path / "store", args)) as server:
        assert first.manifest_digest in pull(server, "hub/lib/app:v1", tmp_path / "a")
        push_upstream(upstream, second, "lib/app:v1")  # the tag moves upstream
        assert second.manifest_digest in pull(server, "hub/lib/app:v1", tmp_path / "b")
        with HttpClient(http_url(server)) as http:  # outside the prefix: not mirrored
            assert http.get("/v2/lib/app/manifests/v1").status == 404
    args = ["--registry-upstream", f"hub=http://{upstream.address}"]  # the default TTL
    with running(http_server(tmp_path / "store", args)) as server:
        push_upstream(upstream, first, "lib/app:v1")  # moved back, but the tag is fresh here
        assert second.manifest_digest in pull(server, "hub/lib/app:v1", tmp_path / "c")


def test_runners_asking_for_one_blob_at_once_make_one_upstream_fetch(
    upstream: UpstreamRegistry, tmp_path: pathlib.Path
) -> None:
    image = write_image(tmp_path / "image", random_layers(6, [8_000_000]))
    push_upstream(upstream, image, "lib/big:v1")
    layer = image.layers[0]
    path = f"/v2/lib/big/blobs/sha256:{sha256(layer)}"
    args = ["--registry-upstream", f"http://{upstream.address}"]
    with running(http_server(tmp_path / "store", args)) as server:

        def fetch(_: int) -> bytes:
            with HttpClient(http_url(server)) as http:
                reply = http.get(path)
                assert reply.status == 200, reply
                return reply.body

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(fetch, range(8)))
        assert all(body == layer for body in bodies)
        assert upstream.requests("GET", path, 200) == 1


def test_an_upstream_behind_the_docker_token_flow_with_credentials_from_the_environment(
    tmp_path: pathlib.Path,
) -> None:
    """Another Slipstream with tokens as the upstream: its 401 names a token realm, which
    takes the mirror's Basic credentials (from the environment) for a bearer token."""
    writer = Token("upstream-writer", "tok-upstream-9f8e", ("read", "cas-write", "ac-write"))
    tokens = write_token_file(tmp_path / "tokens.toml", [writer])
    image = write_image(tmp_path / "image", random_layers(8, [4_000]))
    with running(http_server(tmp_path / "upstream", ["--token-file", str(tokens)])) as private:
        address = http_url(private).removeprefix("http://")
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            f"ci:{writer.value}",
            f"oci:{image.layout}:latest",
            f"docker://{address}/corp/app:v1",
        )
        args = ["--registry-upstream", f"http://{address}"]
        without = http_server(tmp_path / "store-a", args)
        with running(without) as server, HttpClient(http_url(server)) as http:
            reply = http.get("/v2/corp/app/manifests/v1")
            assert reply.status == 404 and b"answered 401" in reply.body, reply
        auth_file = tmp_path / "config.json"
        basic = base64.b64encode(f"mirror:{writer.value}".encode()).decode()
        other = base64.b64encode(b"someone:else").decode()
        auth_file.write_text(
            json.dumps({"auths": {address: {"auth": basic}, "other.example": {"auth": other}}})
        )
        with_file = [*args, "--registry-upstream-auth-file", str(auth_file)]
        with running(http_server(tmp_path / "store-c", with_file)) as server:
            assert image.blobs().items() <= pull(server, "corp/app:v1", tmp_path / "c").items()
        env = {AUTH_ENV: f"mirror:{writer.value}"}
        with running(
            ServerProcess(tmp_path / "store-b", ["--http-listen", "127.0.0.1:0", *args], env=env)
        ) as server:
            assert image.blobs().items() <= pull(server, "corp/app:v1", tmp_path / "a").items()


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("not json", "not JSON"),
        ('{"auths": {"r.example": {"user": "x"}}}', 'has no "auth"'),
        ('{"other": 1}', 'no "auths" object'),
    ],
)
def test_a_bad_upstream_auth_file_is_a_usage_error(
    tmp_path: pathlib.Path, content: str, said: str
) -> None:
    auth_file = tmp_path / "config.json"
    auth_file.write_text(content)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slipstream.cli",
            "serve",
            "--storage",
            str(tmp_path / "s"),
            "--http-listen",
            "127.0.0.1:0",
            "--registry-upstream",
            "http://127.0.0.1:1",
            "--registry-upstream-auth-file",
            str(auth_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert said in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
