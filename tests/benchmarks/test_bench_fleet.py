"""The fleet benchmark keeps working: Slipstream beside BuildGrid under many concurrent
clients on filled disk stores (tiny sizes: 1,000 blobs, 4 clients, 3 s; no timing
assertions). Without BuildGrid (no Python 3.13, no package index) only Slipstream's side
runs, and the test says so."""

from __future__ import annotations

import json
import pathlib

import pytest

from benchmarks import bench_fleet


def test_fleet_benchmark_smoke(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "fleet.json"
    args = ["--smoke", "--storage-dir", str(tmp_path), "--json", str(out), "--rate", "1x"]
    assert bench_fleet.main(args) == 0
    results = json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.json"]  # the stores are gone
    ours = results["phases"][0]
    assert ours["server"] == "slipstream" and ours["errors"] == 0, ours["first_error"]
    assert all(ours["per_op"][op]["count"] > 0 for op in ("find", "read", "update"))
    assert ours["rss_max_mib"] >= ours["rss_start_mib"] > 0
    assert ours["server_cpu_cores"] > 0 and ours["client_cpu_cores"] > 0
    if results.get("buildgrid_unavailable"):
        pytest.skip(f"Slipstream's side ran; BuildGrid not: {results['buildgrid_unavailable']}")
    theirs = results["phases"][1]
    assert theirs["server"] == "buildgrid" and theirs["ops"] > 0
    assert results["throughput_ratio"] > 0
    # --rate 1x: both servers once more, offered BuildGrid's closed-loop throughput.
    open_loop = results["phases"][2:]
    assert sorted(p["server"] for p in open_loop) == ["buildgrid", "slipstream"]
    assert all(p["offered_per_s"] == round(theirs["ops_per_s"], 1) for p in open_loop)
    assert all(p["errors"] == 0 and p["ops"] > 0 for p in open_loop)


def test_fleet_benchmark_workers_and_open_loop(tmp_path: pathlib.Path) -> None:
    """--workers 2 serves with two worker processes; --rate R adds an open-loop phase
    that offers R calls/s on a schedule."""
    out = tmp_path / "fleet.json"
    args = ["--smoke", "--no-buildgrid", "--workers", "2", "--rate", "60"]
    assert bench_fleet.main([*args, "--storage-dir", str(tmp_path), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["slipstream_workers"] == 2
    closed, open_loop = results["phases"]
    assert closed["offered_per_s"] is None and open_loop["offered_per_s"] == 60
    assert open_loop["errors"] == 0, open_loop["first_error"]
    # 3 s at 60 calls/s: 180 scheduled calls, every one made and measured.
    assert open_loop["ops"] == 180
    assert open_loop["server_cpu_cores"] > 0 and open_loop["rss_start_mib"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "fast"], "--rate 'fast'"),
        (["--rate", "0"], "--rate '0'"),
        (["--no-buildgrid", "--rate", "2x"], "--rate Nx needs BuildGrid"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_fleet_benchmark_refuses_bad_options(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_fleet.main(["--smoke", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
