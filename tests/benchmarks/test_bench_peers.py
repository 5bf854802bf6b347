"""The peer benchmark keeps working: Slipstream beside BuildGrid (tiny sizes; no timing
assertions). BuildGrid's venv is set up by the benchmark itself (about 15 s here from the
package index, reused afterwards); without a Python 3.13 only Slipstream's side runs."""

from __future__ import annotations

import json
import pathlib

import pytest

from benchmarks import bench_cache, bench_peers


def test_peer_benchmark_smoke(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The disk stores go where the benchmarks' shared --storage-dir default points.
    monkeypatch.setattr(bench_cache, "RAM_DIRECTORY", tmp_path)
    out = tmp_path / "peers.json"
    assert bench_peers.main(["--smoke", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["storage_dir"] == str(tmp_path)
    kinds = [run["kind"] for run in results["runs"]]
    assert {"memory", "disk"} <= set(kinds)
    for run in results["runs"]:
        assert all(row["rate"] > 0 for row in run["slipstream"])
        assert any(p["operation"].startswith("mixed load") for p in run["pairs"])
    # The reference server (the ceiling any Python server could reach) runs beside them.
    memory = next(run for run in results["runs"] if run["kind"] == "memory")
    assert memory["reference"] and all(row["rate"] > 0 for row in memory["reference"])
    # So does the S3 endpoint alone (the ceiling of any server's S3 batches), when S3 ran.
    for run in results["runs"]:
        if run["kind"] == "s3":
            assert run["s3_endpoint_alone"]["PUT"] > 0 and run["s3_endpoint_alone"]["GET"] > 0
    if results.get("buildgrid_unavailable"):
        pytest.skip(f"Slipstream's side ran; BuildGrid not: {results['buildgrid_unavailable']}")
    for run in results["runs"]:
        assert run["buildgrid"] is not None
        assert all(p["ratio"] is not None for p in run["pairs"])


def test_buildgrid_config_is_cache_only(tmp_path: pathlib.Path) -> None:
    text = bench_peers.buildgrid_config("127.0.0.1:1", "disk", tmp_path, None)
    assert "!cas" in text and "!bytestream" in text and "!action-cache" in text
    assert "!execution" not in text and str(tmp_path) in text


def test_buildgrid_keeps_its_action_cache_where_its_cas_is(tmp_path: pathlib.Path) -> None:
    """Same kind of storage as Slipstream's: on S3, the action cache is in the bucket too."""
    s3 = bench_peers.S3("http://127.0.0.1:1", "ours", "theirs")
    text = bench_peers.buildgrid_config("127.0.0.1:1", "s3", tmp_path, s3)
    assert "!s3action-cache" in text and "!lru-action-cache" not in text
    assert text.count("bucket: theirs") == 2
    memory = bench_peers.buildgrid_config("127.0.0.1:1", "memory", tmp_path, None)
    assert "!lru-action-cache" in memory


def test_python313_is_one_that_runs_as_313(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyenv's shim for python3.13 is on PATH even where no pyenv setting selects 3.13, and
    then only says "command not found": the finder passes over it to pyenv's own 3.13."""
    shims = tmp_path / "shims"
    shims.mkdir()
    shim = shims / "python3.13"
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.13: command not found' >&2\nexit 127\n")
    real = tmp_path / "pyenv" / "versions" / "3.13.0" / "bin" / "python3"
    real.parent.mkdir(parents=True)
    real.write_text("#!/bin/sh\necho True\n")  # answers the finder's version check
    for script in (shim, real):
        script.chmod(0o755)
    monkeypatch.delenv("SLIPSTREAM_BENCH_PYTHON313", raising=False)
    monkeypatch.setenv("PATH", f"{shims}:/usr/bin:/bin")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    assert bench_peers.find_python313() == str(real)
    real.unlink()
    assert bench_peers.find_python313() is None
