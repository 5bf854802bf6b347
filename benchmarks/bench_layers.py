"""Cached layers vs tar + zstd, through the same Slipstream server and storage.

    python -m benchmarks.bench_layers [--json out.json] [--smoke]

The tree is a fresh virtualenv (or, with --smoke, a tiny synthetic tree). For
each method: bytes sent on the first save, on a repeat save of the same tree,
and on a save after one file changed; wall time of saves and of a restore into
an empty directory. tar + zstd is what actions/cache does: one archive per
save, uploaded whole (here as one CAS blob by ByteStream).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zstandard

from slipstream.client.cas_client import CasClient, connect
from slipstream.client.layers import LayerClient
from slipstream.core.digests import BlobId
from tests.support.server_process import ServerProcess

TREE = ".venv"


def make_tree(base: pathlib.Path, smoke: bool) -> None:
    if smoke:
        root = base / TREE / "lib"
        root.mkdir(parents=True)
        for i in range(30):
            (root / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * (i * 20))
        (base / TREE / "bin").mkdir()
        (base / TREE / "bin" / "run").write_text("#!/bin/sh\n")
        (base / TREE / "bin" / "run").chmod(0o755)
        (base / TREE / "bin" / "python").symlink_to(sys.executable)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(base / TREE)], check=True)


def change_one_file(base: pathlib.Path) -> None:
    target = sorted((base / TREE).rglob("*.py"))[0]
    target.write_bytes(target.read_bytes() + b"\n# changed\n")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def tar_zstd(base: pathlib.Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(base / TREE, arcname=TREE)
    return zstandard.ZstdCompressor(level=3, threads=-1).compress(buf.getvalue())


def bench(smoke: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        work = pathlib.Path(tmp)
        src = work / "src"
        src.mkdir()
        make_tree(src, smoke)
        files = sum(len(f) for _, _, f in os.walk(src / TREE))
        server = ServerProcess(work / "store").start()
        try:
            with connect(server.address) as channel:
                return {
                    "tree": "synthetic" if smoke else "virtualenv",
                    "files": files,
                    "tree_bytes": sum(
                        p.stat().st_size
                        for p in (src / TREE).rglob("*")
                        if p.is_file() and not p.is_symlink()
                    ),
                    "layers": _bench_layers(channel, src, work),
                    "tar_zstd": _bench_tar(channel, src, work),
                }
        finally:
            server.stop()
            server.kill()


def _bench_layers(channel: Any, src: pathlib.Path, work: pathlib.Path) -> dict[str, Any]:
    paths = [pathlib.Path(TREE)]
    with LayerClient(channel) as layers:
        first, t_first = timed(lambda: layers.save(paths, "first", base=src))
        repeat, t_repeat = timed(lambda: layers.save(paths, "repeat", base=src))
        change_one_file(src)
        changed, t_changed = timed(lambda: layers.save(paths, "changed", base=src))
        restored, t_restore = timed(lambda: layers.restore("changed", into=work / "out-layers"))
        _, t_noop = timed(lambda: layers.restore("changed", into=work / "out-layers"))
    assert restored.written_files == first.files
    return {
        "first_save": {
            "wire_bytes": first.wire_bytes,
            "blobs": first.uploaded_blobs,
            "seconds": t_first,
        },
        "repeat_save": {
            "wire_bytes": repeat.wire_bytes,
            "blobs": repeat.uploaded_blobs,
            "seconds": t_repeat,
        },
        "changed_save": {
            "wire_bytes": changed.wire_bytes,
            "blobs": changed.uploaded_blobs,
            "seconds": t_changed,
        },
        "restore": {"wire_bytes": restored.wire_bytes, "seconds": t_restore},
        "restore_again": {"seconds": t_noop},
    }


def _bench_tar(channel: Any, src: pathlib.Path, work: pathlib.Path) -> dict[str, Any]:
    with CasClient(channel, compress=False) as cas:

        def save() -> tuple[BlobId, int]:
            data = tar_zstd(src)
            blob = BlobId.of(data)
            cas.upload({blob: data})  # whole, every time, as actions/cache does
            return blob, len(data)

        (blob, size), t_first = timed(save)
        (_, size_repeat), t_repeat = timed(save)
        change_one_file(src)
        (blob, size_changed), t_changed = timed(save)

        def restore() -> None:
            data = cas.read_blob(blob)
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 32)
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                tar.extractall(work / "out-tar", filter="tar")

        _, t_restore = timed(restore)
    return {
        "first_save": {"wire_bytes": size, "seconds": t_first},
        "repeat_save": {"wire_bytes": size_repeat, "seconds": t_repeat},
        "changed_save": {"wire_bytes": size_changed, "seconds": t_changed},
        "restore": {"wire_bytes": size_changed, "seconds": t_restore},
    }


def table(result: dict[str, Any]) -> str:
    rows = [f"{result['tree']}: {result['files']:,} files, {result['tree_bytes']:,} bytes"]
    rows.append(
        f"{'step':<14}{'layers bytes':>14}{'layers s':>10}{'tar+zstd bytes':>16}{'tar s':>8}"
    )
    for step in ("first_save", "repeat_save", "changed_save", "restore"):
        lay, tar = result["layers"][step], result["tar_zstd"][step]
        rows.append(
            f"{step:<14}{lay['wire_bytes']:>14,}{lay['seconds']:>10.2f}"
            f"{tar['wire_bytes']:>16,}{tar['seconds']:>8.2f}"
        )
    rows.append(
        f"{'restore_again':<14}{'':>14}{result['layers']['restore_again']['seconds']:>10.2f}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny synthetic tree (for tests)")
    parser.add_argument("--json", type=pathlib.Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    result = bench(args.smoke)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
