"""Regenerate the Python gRPC code in proto/slipstream_protos from the .proto sources.

python proto/generate.py          # rewrite the generated files
python proto/generate.py --check  # exit 1 when the committed files are stale

The code is generated in a venv of its own (build/proto-venv, made from
proto/requirements.txt on first use), so the protoc that writes it is pinned apart
from the protobuf the project runs on: the committed code is protobuf 5.29 gencode,
which every runtime from 5.29 on loads.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import venv

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
REPO = PROTO_ROOT.parent
PACKAGE = PROTO_ROOT / "slipstream_protos"
# The folder the sources are compiled from: slipstream/protos is a link to PACKAGE,
# so the generated modules import each other as slipstream.protos.*.
IMPORT_PATH = pathlib.PurePosixPath("slipstream/protos")
REQUIREMENTS = PROTO_ROOT / "requirements.txt"
GEN_VENV = REPO / "build" / "proto-venv"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
_IN_VENV = "SLIPSTREAM_PROTO_VENV"


def _venv_python() -> pathlib.Path:
    """The generator venv's python, made or refreshed from REQUIREMENTS as needed."""
    python = GEN_VENV / "bin" / "python"
    stamp = GEN_VENV / "requirements.txt"
    if not python.exists() or not stamp.exists() or stamp.read_text() != REQUIREMENTS.read_text():
        shutil.rmtree(GEN_VENV, ignore_errors=True)
        venv.EnvBuilder(with_pip=True).create(GEN_VENV)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        shutil.copy(REQUIREMENTS, stamp)
    return python


def generate(out_dir: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(IMPORT_PATH / p.name) for p in PACKAGE.glob("*.proto"))
    args = ["protoc", f"-I{REPO}", f"-I{well_known}"]
    args += [f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [f"--mypy_out=quiet:{out_dir}", f"--mypy_grpc_out=quiet:{out_dir}"]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        if protoc.main([*args, *sources]) != 0:
            raise SystemExit("protoc failed")
    finally:
        os.chdir(cwd)


def _generated(root: pathlib.Path) -> dict[str, str]:
    return {
        p.name: p.read_text() for p in sorted(root.iterdir()) if p.name.endswith(GENERATED_SUFFIXES)
    }


def run(check: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        out = pathlib.Path(tmp) / IMPORT_PATH
        fresh = _generated(out)
        if not check:
            for name in _generated(PACKAGE):
                (PACKAGE / name).unlink()
            for name in fresh:
                shutil.copy(out / name, PACKAGE / name)
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


def main() -> int:
    check = "--check" in sys.argv[1:]
    if os.environ.get(_IN_VENV) != "1":
        python = _venv_python()
        env = {**os.environ, _IN_VENV: "1"}
        env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"  # protoc-gen-mypy
        return subprocess.run([str(python), __file__, *sys.argv[1:]], env=env).returncode
    return run(check)


if __name__ == "__main__":
    raise SystemExit(main())
