"""OCI registry test support (tests/oci, benchmarks/bench_registry): images written as OCI
layouts, the clients (skopeo, buildah, podman), and docker-registry as an upstream."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pathlib
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from tests.support.server_process import free_port

SKOPEO = shutil.which("skopeo")
BUILDAH = shutil.which("buildah")
PODMAN = shutil.which("podman")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    """A gzipped tar of files (name -> content), reproducible."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass
class Image:
    """An image written as an OCI layout: its manifest, config and layers by digest."""

    layout: pathlib.Path
    manifest: bytes
    config: bytes
    layers: list[bytes]

    @property
    def manifest_digest(self) -> str:
        return f"sha256:{sha256(self.manifest)}"

    def blobs(self) -> dict[str, bytes]:
        return {f"sha256:{sha256(b)}": b for b in [self.config, *self.layers]}


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": f"sha256:{sha256(data)}", "size": len(data)}


def write_image(layout: pathlib.Path, layers: Sequence[bytes], tag: str = "latest") -> Image:
    """An image of these (gzipped tar) layers, as an OCI layout directory at layout."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    diff_ids = [f"sha256:{sha256(gzip.decompress(layer))}" for layer in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/busybox", "true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [_descriptor(OCI_LAYER, layer) for layer in layers],
        },
        sort_keys=True,
    ).encode()
    for data in (config, manifest, *layers):
        (blobs / sha256(data)).write_bytes(data)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **_descriptor(OCI_MANIFEST, manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return Image(layout, manifest, config, list(layers))


def random_layers(seed: int, sizes: Sequence[int]) -> list[bytes]:
    """Gzipped tar layers of one random (incompressible) file each, of about these sizes."""
    rng = random.Random(seed)
    return [layer_tar({f"layer{i}/data.bin": rng.randbytes(size)}) for i, size in enumerate(sizes)]


def read_layout_blob(layout: pathlib.Path, digest: str) -> bytes:
    algorithm, _, hexdigest = digest.partition(":")
    return (layout / "blobs" / algorithm / hexdigest).read_bytes()


def skopeo(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run skopeo (plain HTTP to the registry, no user configuration)."""
    assert SKOPEO is not None
    return subprocess.run(
        [SKOPEO, "--insecure-policy", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
        env=env if env is not None else {**os.environ},
    )


BUSYBOX = shutil.which("busybox")


class Buildah:
    """buildah (or podman, which builds with the same code) on its own image store (vfs
    driver, chroot isolation): one CI runner."""

    def __init__(self, root: pathlib.Path, tool: str | None = BUILDAH) -> None:
        self.root = root
        self.tool = tool
        root.mkdir(parents=True, exist_ok=True)
        # podman wants a runroot path of at most 50 characters: not under pytest's tmp_path.
        self.runroot = tempfile.mkdtemp(prefix="oci-run-")
        weakref.finalize(self, shutil.rmtree, self.runroot, True)
        (root / "auth.json").write_text('{"auths": {}}')  # no user's logins leak in

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.tool is not None
        extra = ["--cgroup-manager", "cgroupfs", "--events-backend", "none"]
        proc = subprocess.run(
            [
                self.tool,
                "--root",
                str(self.root / "storage"),
                "--runroot",
                self.runroot,
                "--storage-driver",
                "vfs",
                *(extra if self.tool == PODMAN else []),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={
                **os.environ,
                "BUILDAH_ISOLATION": "chroot",
                "REGISTRY_AUTH_FILE": str(self.root / "auth.json"),
            },
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.tool} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc


DOCKER_REGISTRY = shutil.which("docker-registry")


class UpstreamRegistry:
    """Debian's docker-registry (the reference distribution registry) on a free port."""

    def __init__(self, root: pathlib.Path, s3: tuple[str, str] | None = None) -> None:
        """s3: (endpoint URL, bucket) to store there (its s3 driver), else on root's disk."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = root / "registry.log"
        if s3 is None:
            storage = f"  filesystem:\n    rootdirectory: {root / 'data'}\n"
        else:
            storage = (
                f"  s3:\n    region: us-east-1\n    regionendpoint: {s3[0]}\n"
                f"    bucket: {s3[1]}\n    accesskey: testing\n    secretkey: testing\n"
                "    secure: false\n    v4auth: true\n"
            )
        (root / "config.yml").write_text(
            f"version: 0.1\nstorage:\n{storage}  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> UpstreamRegistry:
        assert DOCKER_REGISTRY is not None
        with self.log.open("ab") as log:
            # The Go AWS SDK of its s3 driver cannot take a custom CA bundle: plain HTTP only.
            env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
            self.proc = subprocess.Popen(
                [DOCKER_REGISTRY, "serve", str(self.root / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("docker-registry did not start:\n" + self.log.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def requests(self, method: str, path: str, status: int) -> int:
        """How many requests of method for path it answered with status (its access log)."""
        line = f'"{method} {path} HTTP/1.1" {status} '
        return self.log.read_text().count(line)
