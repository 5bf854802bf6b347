"""The plan for a given input is the one recorded before the splitter's speed-up (issue 23):
``slipstream split`` over a generated 20,000-test suite and its JUnit reports, every
(timings, --by, --total) case of benchmarks/bench_split_scale.py, prints the recorded plan
hash (tests/splitter/data/plan_hashes.json, made with ``--record-hashes`` by the code before
the change)."""

from __future__ import annotations

import io
import json
import pathlib

import pytest

from benchmarks import bench_split_scale
from slipstream.cli import main

TESTS = 20_000
RECORDED = json.loads(bench_split_scale.HASHES.read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("suite")
    bench_split_scale.prepare(directory, TESTS)
    return directory


@pytest.mark.parametrize(("timings", "by", "total"), bench_split_scale.hash_cases())
def test_the_plan_is_the_recorded_one(
    inputs: pathlib.Path,
    timings: str,
    by: str,
    total: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for var in ("CIRCLE_NODE_INDEX", "CI_NODE_INDEX", "BUILDKITE_PARALLEL_JOB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO((inputs / "ids.txt").read_text()))
    assert main(bench_split_scale.split_args(inputs, timings, by, total)) == 0
    err = capsys.readouterr().err
    assert err.rsplit("plan ", 1)[1].strip() == RECORDED[str(TESTS)][f"{timings}/{by}/{total}"]
