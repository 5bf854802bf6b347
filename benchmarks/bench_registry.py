"""OCI registry benchmark: Slipstream's /v2/ beside the reference registry (docker-registry 2.8).

    python -m benchmarks.bench_registry [--smoke] [--mib 200] [--layers 10] [--storage-dir DIR]
                                        [--s3]

Both registries store on the same filesystem (a temp dir under --storage-dir,
/dev/shm by default): Slipstream's disk store, docker-registry's filesystem
driver; with --s3, both on one moto server (a bucket each; docker-registry
through its s3 driver). With skopeo (Debian's), for each registry:
  - push of an image of --layers random layers, --mib MiB in all, from an OCI layout
  - pull of it into a fresh OCI layout
  - 8 pulls at once (8 skopeo processes), wall time
  - a cached build: `buildah bud --layers --cache-to/--cache-from` of two steps by a
    first runner, then the timed one by a second runner with an empty image store
    (needs buildah, a static busybox and root; skipped, saying so, otherwise)
Prints seconds for each, and Slipstream's time over the reference's (below 1: faster).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tests.support.moto import AWS_ENV, moto_client, moto_server
from tests.support.oci import (
    BUILDAH,
    BUSYBOX,
    DOCKER_REGISTRY,
    SKOPEO,
    Buildah,
    UpstreamRegistry,
    random_layers,
    skopeo,
    write_image,
)
from tests.support.server_process import ServerProcess, http_url

CONTAINERFILE = """FROM {registry}/base/busybox:v1
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox seq 1 200000 > /one.txt"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/urandom of=/two.bin bs=1M count={mib}"]
"""


@contextmanager
def slipstream(root: pathlib.Path, s3: tuple[str, str] | None) -> Iterator[str]:
    storage: str | pathlib.Path = root / "store"
    args = ["--http-listen", "127.0.0.1:0"]
    if s3 is not None:
        storage = f"s3://{s3[1]}"
        args += ["--s3-endpoint", s3[0], "--s3-region", "us-east-1", "--s3-addressing", "path"]
    server = ServerProcess(storage, args, env=AWS_ENV).start()
    try:
        yield http_url(server).removeprefix("http://")
    finally:
        server.stop()
        server.kill()


@contextmanager
def reference(root: pathlib.Path, s3: tuple[str, str] | None) -> Iterator[str]:
    registry = UpstreamRegistry(root, s3).start()
    try:
        yield registry.address
    finally:
        registry.stop()


@contextmanager
def buckets(enabled: bool) -> Iterator[dict[str, tuple[str, str] | None]]:
    """Each registry's (moto endpoint, bucket), or None each without --s3."""
    if not enabled:
        yield {"slipstream": None, "docker-registry": None}
        return
    with moto_server() as url:
        client = moto_client(url)
        names = {"slipstream": "bench-slipstream", "docker-registry": "bench-reference"}
        for bucket in names.values():
            client.create_bucket(Bucket=bucket)
        yield {who: (url, bucket) for who, bucket in names.items()}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    address: str, layout: pathlib.Path, work: pathlib.Path, build_mib: int
) -> dict[str, float]:
    results: dict[str, float] = {}
    dest = f"docker://{address}/bench/app:v1"
    results["push"] = timed(
        lambda: skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:latest", dest)
    )
    results["pull"] = timed(
        lambda: skopeo("copy", "--src-tls-verify=false", dest, f"oci:{work / 'pull'}:v1")
    )

    def one(i: int) -> None:
        skopeo("copy", "--src-tls-verify=false", dest, f"oci:{work / f'pull-{i}'}:v1")

    def eight() -> None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(8)))

    results["8 pulls at once"] = timed(eight)
    if BUILDAH is None or BUSYBOX is None or os.geteuid() != 0:
        print("cached build: skipped (needs buildah, busybox-static and root)")
        return results
    base = Buildah(work / "base")
    ctr = base("from", "scratch").stdout.strip()
    base("copy", ctr, BUSYBOX, "/bin/busybox")
    base("commit", ctr, "localhost/busybox:v1")
    base(
        "push", "--tls-verify=false", "localhost/busybox:v1", f"docker://{address}/base/busybox:v1"
    )
    context = work / "context"
    context.mkdir()
    (context / "Containerfile").write_text(CONTAINERFILE.format(registry=address, mib=build_mib))
    cache = f"{address}/cache/app"

    def build(runner: str) -> None:
        Buildah(work / runner)(
            "bud",
            "--isolation",
            "chroot",
            "--layers",
            "--tls-verify=false",
            "--cache-to",
            cache,
            "--cache-from",
            cache,
            "-t",
            "app",
            str(context),
        )

    build("runner1")
    results["cached build"] = timed(lambda: build("runner2"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it runs")
    parser.add_argument("--mib", type=int, default=200, help="size of the image (default 200)")
    parser.add_argument("--layers", type=int, default=10, help="layers of the image (default 10)")
    parser.add_argument("--s3", action="store_true", help="both on S3 (moto) instead of files")
    parser.add_argument(
        "--storage-dir",
        type=pathlib.Path,
        default=pathlib.Path("/dev/shm") if pathlib.Path("/dev/shm").is_dir() else None,
    )
    args = parser.parse_args(argv)
    if SKOPEO is None or DOCKER_REGISTRY is None:
        print("needs skopeo and docker-registry (apt-get install skopeo docker-registry)")
        return 2
    mib, layers = (4, 2) if args.smoke else (args.mib, args.layers)
    with tempfile.TemporaryDirectory(prefix="bench-registry-", dir=args.storage_dir) as tmp:
        root = pathlib.Path(tmp)
        sizes = [(mib << 20) // layers] * layers
        layout = write_image(root / "image", random_layers(1, sizes)).layout
        rows = {}
        with buckets(args.s3) as where:
            for name, serve in (("slipstream", slipstream), ("docker-registry", reference)):
                work = root / name
                work.mkdir()
                with serve(work / "server", where[name]) as address:
                    rows[name] = measure(address, layout, work, max(1, mib // 10))
                shutil.rmtree(work, ignore_errors=True)
    kind = "S3 (moto)" if args.s3 else f"files under {args.storage_dir}"
    print(f"\nimage: {layers} layers, {mib} MiB; storage: {kind}")
    print(f"{'':18} {'slipstream':>11} {'reference':>11} {'ratio':>7}")
    for what, ours in rows["slipstream"].items():
        theirs = rows["docker-registry"].get(what)
        ratio = f"{ours / theirs:7.2f}" if theirs else "      -"
        print(f"{what:18} {ours:10.2f}s {theirs or 0:10.2f}s {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
