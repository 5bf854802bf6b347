"""Regenerate the Python gRPC code in proto/slipstream_protos from the .proto sources.

python proto/generate.py          # rewrite the generated files
python proto/generate.py --check  # exit 1 when the committed files are stale
"""

from __future__ import annotations

import difflib
import pathlib
import shutil
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
PACKAGE = PROTO_ROOT / "slipstream_protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _include_dirs() -> list[str]:
    import google.rpc  # googleapis-common-protos ships google/rpc/status.proto

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    googleapis = pathlib.Path(next(iter(google.rpc.__path__))).parent.parent
    return [str(PROTO_ROOT), str(well_known), str(googleapis)]


def generate(out_dir: pathlib.Path) -> None:
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE.glob("*.proto"))
    args = ["protoc", *(f"-I{d}" for d in _include_dirs())]
    args += [f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [f"--mypy_out={out_dir}", f"--mypy_grpc_out={out_dir}"]
    if protoc.main([*args, *sources]) != 0:
        raise SystemExit("protoc failed")


def _generated(root: pathlib.Path) -> dict[str, str]:
    return {
        p.name: p.read_text() for p in sorted(root.iterdir()) if p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        fresh = _generated(pathlib.Path(tmp) / "slipstream_protos")
        if not check:
            for name in _generated(PACKAGE):
                (PACKAGE / name).unlink()
            for name in fresh:
                shutil.copy(pathlib.Path(tmp) / "slipstream_protos" / name, PACKAGE / name)
            return 0
    committed = _generated(PACKAGE)
    stale = False
    for name in sorted(set(fresh) | set(committed)):
        if fresh.get(name) != committed.get(name):
            stale = True
            diff = difflib.unified_diff(
                committed.get(name, "").splitlines(),
                fresh.get(name, "").splitlines(),
                f"committed/{name}",
                f"generated/{name}",
                lineterm="",
            )
            print("\n".join(list(diff)[:40]))
    if stale:
        print("generated gRPC code is stale: run `python proto/generate.py` and commit")
        return 1
    print("generated gRPC code is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
