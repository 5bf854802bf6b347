"""The registry benchmark keeps working (tiny sizes; no timing assertions)."""

from __future__ import annotations

import pathlib

import pytest

from benchmarks import bench_registry
from tests.support.oci import DOCKER_REGISTRY, SKOPEO


@pytest.mark.skipif(
    SKOPEO is None or DOCKER_REGISTRY is None,
    reason="needs skopeo and docker-registry (CI installs Debian's, see .ci/setup)",
)
def test_registry_benchmark_smoke(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_registry.main(["--smoke", "--storage-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("push", "pull", "8 pulls at once"):
        assert any(line.startswith(row) for line in out.splitlines()), out
