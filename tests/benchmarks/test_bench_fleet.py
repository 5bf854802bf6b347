"""The fleet benchmark keeps working: Slipstream beside BuildGrid and the reference server
under many concurrent clients on filled stores (tiny sizes: 1,000 blobs, 4 clients, 3 s;
no timing assertions). Without BuildGrid (no Python 3.13, no package index) only
Slipstream's side and the reference run, and the test says so."""

from __future__ import annotations

import json
import pathlib

import grpc
import pytest

from benchmarks import bench_fleet
from benchmarks.bench_peers import reference_process
from benchmarks.fleet_store import blob_digest, fill_over_grpc
from slipstream.protos import remote_execution_pb2 as re_pb2
from slipstream.protos import remote_execution_pb2_grpc as re_grpc


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
    # The reference server (grpc.aio by default) under the same load: the ceiling.
    ceiling = next(p for p in results["phases"] if p["server"] == "reference-aio")
    assert ceiling["errors"] == 0 and ceiling["ops"] > 0, ceiling["first_error"]
    assert results["ceiling"] == "reference-aio" and results["slipstream_of_reference"] > 0
    if results.get("buildgrid_unavailable"):
        pytest.skip(f"Slipstream's side ran; BuildGrid not: {results['buildgrid_unavailable']}")
    theirs = results["phases"][1]
    assert theirs["server"] == "buildgrid" and theirs["ops"] > 0
    assert results["throughput_ratio"] > 0 and results["reference_ratio"] > 0
    # --rate 1x: every server once more, offered BuildGrid's closed-loop throughput.
    open_loop = results["phases"][3:]
    assert sorted(p["server"] for p in open_loop) == ["buildgrid", "reference-aio", "slipstream"]
    assert all(p["offered_per_s"] == round(theirs["ops_per_s"], 1) for p in open_loop)
    assert all(p["errors"] == 0 and p["ops"] > 0 for p in open_loop)


def test_fleet_benchmark_reference_kinds(tmp_path: pathlib.Path) -> None:
    """--reference threads,aio loads both kinds of reference server, each filled through
    the wire: every batch read of a filled blob and every GetActionResult of a filled
    action is answered (the clients count anything else as an error)."""
    out = tmp_path / "fleet.json"
    args = ["--smoke", "--no-buildgrid", "--reference", "threads,aio", "--json", str(out)]
    assert bench_fleet.main([*args, "--storage-dir", str(tmp_path)]) == 0
    results = json.loads(out.read_text())
    phases = {p["server"]: p for p in results["phases"]}
    assert list(phases) == ["slipstream", "reference", "reference-aio"]
    for name in ("reference", "reference-aio"):
        phase = phases[name]
        assert phase["errors"] == 0, phase["first_error"]
        assert all(f["count"] > 0 for f in phase["per_op"].values())
        assert phase["server_cpu_cores"] > 0 and phase["rss_start_mib"] > 0
    assert set(results["fill_seconds"]) == {"slipstream", "reference", "reference-aio"}
    faster = max(("reference", "reference-aio"), key=lambda n: phases[n]["ops_per_s"])
    assert results["ceiling"] == faster


@pytest.mark.parametrize("aio", [False, True], ids=["threads", "aio"])
def test_fill_over_grpc_sends_every_blob(aio: bool) -> None:
    """The fill of a server that keeps its blobs in memory: in many batches, every blob
    arrives."""
    with (
        reference_process(aio=aio) as (address, _),
        grpc.insecure_channel(address) as channel,
    ):
        fill_over_grpc(channel, 1_000, seed=7, batch_bytes=20_000)  # ~28 batches
        cas = re_grpc.ContentAddressableStorageStub(channel)
        everything = [blob_digest(7, i) for i in range(1_000)]
        found = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=everything))
        assert list(found.missing_blob_digests) == []
        read = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=everything[-3:]))
        assert [len(r.data) for r in read.responses] == [d.size_bytes for d in everything[-3:]]


def test_fleet_benchmark_workers_and_open_loop(tmp_path: pathlib.Path) -> None:
    """--workers 2 serves with two worker processes; --rate R adds an open-loop phase
    that offers R calls/s on a schedule."""
    out = tmp_path / "fleet.json"
    args = ["--smoke", "--no-buildgrid", "--no-reference", "--workers", "2", "--rate", "60"]
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
        (["--reference", "fast"], "--reference 'fast'"),
    ],
)
def test_fleet_benchmark_refuses_bad_options(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_fleet.main(["--smoke", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
