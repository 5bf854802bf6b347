"""The dependency order holds: lint-imports (as .ci/run calls it) fails on an import against it."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LINT = pathlib.Path(sys.executable).parent / "lint-imports"
_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "build", "node_modules", "__pycache__", "*.egg-info"
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("order") / "repo"
    shutil.copytree(REPO, root, symlinks=True, ignore=_SKIP)
    return root


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("splitter/ids.py", "import slipstream.cache_server.auth", "Layers"),
        ("splitter/ids.py", "import grpc", "The pure splitter"),
        ("cache_server/digests_use.py", "import slipstream.client.layers", "Layers"),
        ("client/layers.py", "import slipstream.cache_server.server", "Layers"),
        ("slipstream/core/errors.py", "import slipstream.splitter.ids", "Layers"),
        ("benchmarks/bench_http.py", "import tests.s3.conftest", "Benchmarks share"),
    ],
)
def test_an_import_against_the_order_fails(
    tree: pathlib.Path, module: str, line: str, contract: str
) -> None:
    assert LINT.exists(), f"{LINT} is not installed"
    path = tree / module
    original = path.read_text() if path.exists() else None
    path.write_text((original or "") + f"\n{line}  # noqa\n")
    try:
        proc = _lint(tree)
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_text(original)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    broken = [ln for ln in proc.stdout.splitlines() if ln.endswith("BROKEN") or " BROKEN " in ln]
    assert any(ln.startswith(contract) for ln in broken), proc.stdout


def test_the_tree_as_it_is_keeps_every_contract(tree: pathlib.Path) -> None:
    proc = _lint(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
