"""End-to-end: buildah's layer cache in the registry (`bud --layers --cache-to --cache-from`).

A base image made offline (`buildah from scratch` + Debian's static busybox) is
pushed to /v2/; a Containerfile of two RUN steps on it is built by a first runner
with the registry as its layer cache, which pushes each step's layer there; a
second runner with an empty image store then takes both steps from the cache
(buildah says so) and ends with the same image id, and so does a third one after
the server restarted. The final image, pushed, pulls back with skopeo, verified.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterator

import pytest

from tests.ops.helpers import Token, write_token_file
from tests.support.oci import BUILDAH, BUSYBOX, PODMAN, SKOPEO, Buildah, sha256, skopeo
from tests.support.server_process import ServerProcess, free_port, http_url, running

pytestmark = pytest.mark.skipif(
    BUILDAH is None or BUSYBOX is None or SKOPEO is None or os.geteuid() != 0,
    reason="needs buildah, skopeo and a static busybox (CI installs Debian's) and root "
    "(chroot isolation)",
)

WRITER = Token("ci-main", "tok-buildah-writer-8e9f", ("read", "cas-write", "ac-write"))
CONTAINERFILE = """FROM {registry}/base/busybox:v1
RUN ["/bin/busybox", "sh", "-c", "echo one > /one.txt"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox seq 1 1000 > /two.txt"]
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("buildah")


def make_base_and_context(server: ServerProcess, root: pathlib.Path) -> pathlib.Path:
    """Push the busybox base image (once) and write the Containerfile; its directory."""
    context = root / "context"
    if context.is_dir():
        return context
    assert BUSYBOX is not None
    base = Buildah(root / "base-maker")
    ctr = base("from", "scratch").stdout.strip()
    base("copy", ctr, BUSYBOX, "/bin/busybox")
    base("config", "--cmd", '["/bin/busybox", "sh"]', ctr)
    base("commit", ctr, "localhost/busybox:v1")
    base(
        "push",
        "--tls-verify=false",
        "--creds",
        f"ci:{WRITER.value}",
        "localhost/busybox:v1",
        f"docker://{registry(server)}/base/busybox:v1",
    )
    context.mkdir()
    (context / "Containerfile").write_text(CONTAINERFILE.format(registry=registry(server)))
    return context


@pytest.fixture(scope="module")
def server(root: pathlib.Path) -> Iterator[ServerProcess]:
    tokens = write_token_file(root / "tokens.toml", [WRITER])
    http_listen = (
        f"127.0.0.1:{free_port()}"  # one port across the restart: the Containerfile names it
    )
    args = ["--http-listen", http_listen, "--token-file", str(tokens)]
    with running(ServerProcess(root / "store", args)) as proc:
        yield proc


def registry(server: ServerProcess) -> str:
    return http_url(server).removeprefix("http://")


def build(
    runner: Buildah, server: ServerProcess, context: pathlib.Path, cache_repo: str = "cache/app"
) -> tuple[str, str]:
    """(buildah's output, the image id) of a cached build of the context."""
    cache = f"{registry(server)}/{cache_repo}"
    proc = runner(
        "build",
        "--isolation",
        "chroot",
        "--layers",
        "--tls-verify=false",
        "--creds",
        f"ci:{WRITER.value}",
        "--cache-to",
        cache,
        "--cache-from",
        cache,
        "-t",
        "app:latest",
        str(context),
    )
    return proc.stdout + proc.stderr, proc.stdout.strip().splitlines()[-1]


def test_a_second_runner_takes_every_step_from_the_registry_cache(
    server: ServerProcess, root: pathlib.Path
) -> None:
    context = make_base_and_context(server, root)

    first_output, first_id = build(Buildah(root / "runner1"), server, context)
    assert first_output.count("Pushing cache") == 2, first_output
    second_output, second_id = build(Buildah(root / "runner2"), server, context)
    assert second_output.count("Cache pulled from remote") == 2, second_output
    assert second_id == first_id and re.fullmatch(r"[0-9a-f]{64}", first_id)

    server.stop()
    server.output.clear()
    server.start()
    runner3 = Buildah(root / "runner3")
    third_output, third_id = build(runner3, server, context)
    assert third_output.count("Cache pulled from remote") == 2, third_output
    assert third_id == first_id

    runner3(
        "push",
        "--tls-verify=false",
        "--creds",
        f"ci:{WRITER.value}",
        "app:latest",
        f"docker://{registry(server)}/team/app:built",
    )
    dest = root / "pulled"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        f"ci:{WRITER.value}",
        f"docker://{registry(server)}/team/app:built",
        f"oci:{dest}:built",
    )
    blobs = list((dest / "blobs" / "sha256").iterdir())
    assert len(blobs) >= 5  # manifest, config, three layers
    for path in blobs:
        assert sha256(path.read_bytes()) == path.name


@pytest.mark.skipif(PODMAN is None, reason="needs podman (CI installs Debian's, see .ci/setup)")
def test_podman_builds_with_the_registry_cache_and_pulls_through_it(
    server: ServerProcess, root: pathlib.Path
) -> None:
    context = make_base_and_context(server, root)
    first_output, first_id = build(Buildah(root / "podman1", PODMAN), server, context, "cache/pod")
    assert first_output.count("Pushing cache") == 2, first_output
    second = Buildah(root / "podman2", PODMAN)
    second_output, second_id = build(second, server, context, "cache/pod")
    assert second_output.count("Cache pulled from remote") == 2, second_output
    assert second_id == first_id
    pulled = Buildah(root / "podman3", PODMAN)
    pulled(
        "pull",
        "--tls-verify=false",
        "--creds",
        f"ci:{WRITER.value}",
        f"{registry(server)}/base/busybox:v1",
    )
    assert "base/busybox" in pulled("images").stdout
