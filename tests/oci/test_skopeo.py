"""End-to-end: Debian's skopeo pushes an image to the registry at /v2/ and pulls it back.

The image is an OCI layout written by the test (a few layers, one over a MiB so
uploads span chunks); skopeo copies it to docker://127.0.0.1:PORT/REPO:TAG with
`--dest-creds user:TOKEN` (the token as the password, through the Docker token
flow) and back into a fresh layout, where every blob must hash to its name. A
pushed layer is the same CAS blob at /cas/ and over gRPC, and all of it
survives a restart. Scopes: a read-only token cannot push, no token gets nothing.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import pytest

from tests.http.helpers import HttpClient, http_server
from tests.ops.helpers import Token, channel_for, write_token_file
from tests.support.oci import SKOPEO, Image, random_layers, sha256, skopeo, write_image
from tests.support.reapi import Reapi, digest
from tests.support.server_process import ServerProcess, http_url, running

pytestmark = pytest.mark.skipif(
    SKOPEO is None, reason="needs skopeo (CI installs Debian's skopeo, see .ci/setup)"
)

WRITER = Token("ci-main", "tok-skopeo-writer-4a5b", ("read", "cas-write", "ac-write"))
READER = Token("dev", "tok-skopeo-reader-6c7d", ("read",))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("skopeo")


@pytest.fixture(scope="module")
def server(root: pathlib.Path) -> Iterator[ServerProcess]:
    tokens = write_token_file(root / "tokens.toml", [WRITER, READER])
    with running(http_server(root / "store", ["--token-file", str(tokens)])) as proc:
        yield proc


@pytest.fixture(scope="module")
def image(root: pathlib.Path) -> Image:
    return write_image(root / "image", random_layers(7, [2_500_000, 40_000, 300, 1]))


def registry(server: ServerProcess) -> str:
    return http_url(server).removeprefix("http://")


def push(server: ServerProcess, image: Image, ref: str, token: Token | None, *extra: str) -> str:
    creds = ["--dest-creds", f"ci:{token.value}"] if token else ["--dest-no-creds"]
    proc = skopeo(
        "copy",
        "--dest-tls-verify=false",
        *creds,
        *extra,
        f"oci:{image.layout}:latest",
        f"docker://{registry(server)}/{ref}",
        check=False,
    )
    assert proc.returncode == 0 or token is not WRITER, proc.stderr
    return proc.stderr if proc.returncode else ""


def pull_and_verify(
    server: ServerProcess, ref: str, dest: pathlib.Path, token: Token
) -> dict[str, bytes]:
    """skopeo copy the image into an OCI layout at dest; every blob verified; {digest: bytes}."""
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        f"dev:{token.value}",
        f"docker://{registry(server)}/{ref}",
        f"oci:{dest}:pulled",
    )
    blobs = {}
    for path in (dest / "blobs" / "sha256").iterdir():
        data = path.read_bytes()
        assert sha256(data) == path.name, f"blob {path.name} does not verify"
        blobs[f"sha256:{path.name}"] = data
    return blobs


def test_push_pull_round_trip_as_oci_and_docker_manifests(
    server: ServerProcess, image: Image, root: pathlib.Path
) -> None:
    push(server, image, "team/app:v1", WRITER)
    pulled = pull_and_verify(server, "team/app:v1", root / "pulled-oci", READER)
    assert image.blobs().items() <= pulled.items()
    assert pulled[image.manifest_digest] == image.manifest  # pushed as is
    # The same layers as a Docker v2 schema 2 image (skopeo converts the manifest).
    push(server, image, "team/app:docker", WRITER, "--format", "v2s2")
    inspected = json.loads(
        skopeo(
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            f"dev:{READER.value}",
            f"docker://{registry(server)}/team/app:docker",
        ).stdout
    )
    assert inspected["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    docker = pull_and_verify(server, "team/app:docker", root / "pulled-docker", READER)
    assert set(image.blobs()) - {f"sha256:{sha256(image.config)}"} <= set(docker)
    tags = json.loads(
        skopeo(
            "list-tags",
            "--tls-verify=false",
            "--creds",
            f"dev:{READER.value}",
            f"docker://{registry(server)}/team/app",
        ).stdout
    )
    assert sorted(tags["Tags"]) == ["docker", "v1"]


def test_a_pushed_layer_is_a_cas_blob_over_http_and_grpc_and_survives_a_restart(
    server: ServerProcess, image: Image, root: pathlib.Path
) -> None:
    push(server, image, "team/cas:v1", WRITER)
    layer = image.layers[0]
    with HttpClient(http_url(server), token=READER.value) as http:
        assert http.get(f"/cas/{sha256(layer)}").body == layer
    with channel_for(server, READER.value) as ch:
        assert Reapi(ch).read(digest(layer)) == layer
    server.stop()
    server.output.clear()
    server.start()
    pulled = pull_and_verify(server, "team/cas:v1", root / "after-restart", READER)
    assert image.blobs().items() <= pulled.items()


def test_scopes_a_read_only_token_cannot_push_and_no_token_gets_nothing(
    server: ServerProcess, image: Image, root: pathlib.Path
) -> None:
    refused = push(server, image, "team/readonly:v1", READER)
    assert refused and ("denied" in refused.lower() or "unauthorized" in refused.lower()), refused
    anonymous = push(server, image, "team/anon:v1", None)
    assert anonymous and "unauthorized" in anonymous.lower(), anonymous
    proc = skopeo(
        "inspect",
        "--tls-verify=false",
        "--no-creds",
        f"docker://{registry(server)}/team/app:v1",
        check=False,
    )
    assert proc.returncode != 0 and "unauthorized" in proc.stderr.lower(), proc.stderr
    with HttpClient(http_url(server), token=READER.value) as http:
        assert http.get("/v2/team/readonly/manifests/v1").status == 404


def _sessions_by_worker(server: ServerProcess) -> dict[str, set[int]]:
    """The pids of the workers that served each upload session (its path) so far."""
    sessions: dict[str, set[int]] = {}
    for line in list(server.output):
        if line.startswith("{") and "/blobs/uploads/" in line:
            record = json.loads(line)
            path = record["message"].split()[2].split("?")[0]  # "HTTP PATCH PATH 202 1.2ms"
            if not path.endswith("/uploads/"):  # a POST opening one
                sessions.setdefault(path, set()).add(int(record["pid"]))
    return sessions


def test_push_and_pull_against_two_workers(root: pathlib.Path) -> None:
    """`serve --workers 2`: skopeo pushes over several connections, which the kernel
    spreads over the workers; images of new layers are pushed until the requests of one
    upload session have reached both workers, and each is pulled back whole."""
    tokens = write_token_file(root / "tokens-workers.toml", [WRITER, READER])
    args = ["--workers", "2", "--token-file", str(tokens), "--log-level", "INFO"]
    server = http_server(root / "workers-store", [*args, "--log-format", "json"])
    with running(server) as workers:
        for attempt in range(12):
            sizes = [1_500_000, 900_000, 400_000, 60_000, 2_000, 1]
            image = write_image(root / f"image-workers-{attempt}", random_layers(attempt, sizes))
            ref = f"team/workers:v{attempt}"
            assert push(workers, image, ref, WRITER) == ""
            pulled = pull_and_verify(workers, ref, root / f"pulled-workers-{attempt}", READER)
            assert image.blobs().items() <= pulled.items()
            assert pulled[image.manifest_digest] == image.manifest
            crossed = [s for s, pids in _sessions_by_worker(workers).items() if len(pids) > 1]
            if crossed:
                break
        assert crossed, "no upload session reached both workers in 12 pushes"
