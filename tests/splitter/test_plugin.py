"""The pytest plugin end to end: real ``python -m pytest`` runs of a sample project."""

from __future__ import annotations

import collections
import pathlib

import pytest

from benchmarks.bench_split import ShardRun, make_sample_project, run_pytest, run_shard
from slipstream.splitter.ids import node_id
from slipstream.splitter.junit import read_reports

TOTAL = 3


def junit_ids(path: pathlib.Path) -> list[str]:
    reports, warnings = read_reports([path])
    assert warnings == []
    return [node_id(c) for c in reports[0].cases]


def junit_file_costs(path: pathlib.Path) -> dict[str, float]:
    reports, _ = read_reports([path])
    return reports[0].file_costs


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The sample project after one full, unsharded run that wrote full.xml."""
    root = tmp_path_factory.mktemp("sample")
    make_sample_project(root)
    _, proc = run_pytest(root, "-q", "--shard-junit", "full.xml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.fixture(scope="module")
def all_ids(project: pathlib.Path) -> list[str]:
    return collected_ids(project)


def collected_ids(project: pathlib.Path) -> list[str]:
    """The node ids pytest collects in the sample project (all 55 of them)."""
    _, proc = run_pytest(project, "-q", "--collect-only")
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) == 55
    return ids


def test_the_sample_project_uses_no_deprecated_pytest_pattern(tmp_path):
    # So that the tests of the plugin do not change with what a newer pytest warns about.
    make_sample_project(tmp_path)
    args = ("-q", "-p", "no:slipstream_split", "-W", "error::pytest.PytestDeprecationWarning")
    _, proc = run_pytest(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_full_run_report_maps_back_to_node_ids(project, all_ids):
    assert sorted(junit_ids(project / "full.xml")) == sorted(all_ids)
    costs = junit_file_costs(project / "full.xml")
    # The expensive import and the module fixture are learnt as file costs.
    assert costs["tests/test_import.py"] >= 0.15
    assert costs["tests/sub/test_module_fixture.py"] >= 0.15


def test_every_test_runs_exactly_once_across_shards(project, all_ids):
    shards = [run_shard(project, i, TOTAL, "--shard-timings", "full.xml") for i in range(TOTAL)]
    for s in shards:
        assert s.returncode == 0, s.output
    ran = collections.Counter(
        t for i in range(TOTAL) for t in junit_ids(project / f"shard-{i}.xml")
    )
    assert sorted(ran) == sorted(all_ids)
    assert set(ran.values()) == {1}
    assert len({s.plan_hash for s in shards}) == 1 and shards[0].plan_hash
    # xdist_group marks keep tests together, across files too.
    shard_of = {t: i for i in range(TOTAL) for t in junit_ids(project / f"shard-{i}.xml")}
    db = {
        shard_of["tests/test_grouped.py::test_db_first"],
        shard_of["tests/test_grouped.py::TestDb::test_db_second"],
    }
    io = {shard_of["tests/test_grouped.py::test_io_here"], shard_of["tests/test_import.py::test_b"]}
    assert len(db) == 1 and len(io) == 1
    # Files wholly owned by other shards are not collected (so not imported) at all.
    for i in range(TOTAL):
        collected = set(junit_file_costs(project / f"shard-{i}.xml"))
        needed = {t.split("::")[0] for t in junit_ids(project / f"shard-{i}.xml")}
        assert collected == needed, (i, collected, needed)
    slowest = max(shards, key=lambda s: s.wall)
    predicted = max(s.predicted or 0.0 for s in shards)
    line = (
        f"slowest shard: measured {slowest.wall:.2f}s wall (process start-up and collection "
        f"included), predicted makespan {predicted:.2f}s"
    )
    print(line)
    assert all(s.predicted is not None for s in shards)


def test_shard_is_the_same_whatever_the_collection_order_and_with_xdist(project):
    first = run_shard(project, 1, TOTAL, "--shard-timings", "full.xml")
    expected = sorted(junit_ids(project / "shard-1.xml"))
    args = ["--shard-timings", "full.xml", "-p", "no:randomly"]
    reordered = run_shard(project, 1, TOTAL, *args, "tests/sub", "tests/test_slow.py", "tests")
    assert reordered.returncode == 0, reordered.output
    assert sorted(junit_ids(project / "shard-1.xml")) == expected
    parallel = run_shard(
        project, 1, TOTAL, "--shard-timings", "full.xml", "-n", "2", "--dist", "loadgroup"
    )
    assert parallel.returncode == 0, parallel.output
    assert sorted(junit_ids(project / "shard-1.xml")) == expected  # no "@group" suffixes
    assert first.plan_hash == reordered.plan_hash == parallel.plan_hash


def test_new_tests_are_run_exactly_once(project, tmp_path):
    # A copy of the project with a new file and a new test in a known file.
    import shutil

    root = tmp_path / "p"
    shutil.copytree(project, root)
    (root / "tests" / "test_brand_new.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(5))\ndef test_n(i):\n    pass\n"
    )
    with (root / "tests" / "test_slow.py").open("a") as f:
        f.write("\n\ndef test_added_later():\n    pass\n")
    ran: collections.Counter[str] = collections.Counter()
    for i in range(TOTAL):
        s = run_shard(root, i, TOTAL, "--shard-timings", "full.xml")
        assert s.returncode == 0, s.output
        ran.update(junit_ids(root / f"shard-{i}.xml"))
    assert set(ran.values()) == {1}
    assert len(ran) == 55 + 6
    assert "tests/test_slow.py::test_added_later" in ran


def test_without_timings_split_evenly_by_count_with_a_warning(project, all_ids, tmp_path):
    shards = [run_shard(project, i, 2, f"--shard-storage-dir={tmp_path / 'empty'}") for i in (0, 1)]
    ran: collections.Counter[str] = collections.Counter()
    for i, s in enumerate(shards):
        assert s.returncode == 0, s.output
        assert "no timings for this suite: splitting evenly by count" in s.output
        ran.update(junit_ids(project / f"shard-{i}.xml"))
    assert set(ran.values()) == {1} and sorted(ran) == sorted(all_ids)
    assert abs(sum(ran.values()) / 2 - len(junit_ids(project / "shard-0.xml"))) <= 2
    assert shards[0].plan_hash and shards[0].plan_hash == shards[1].plan_hash


def test_record_into_the_history_then_split_from_it(project, all_ids, tmp_path):
    store = tmp_path / "store"
    _, proc = run_pytest(
        project, "-q", "--shard-record", f"--shard-storage-dir={store}", "--shard-run-id", "r1"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran: collections.Counter[str] = collections.Counter()
    for i in range(2):
        s = run_shard(project, i, 2, f"--shard-storage-dir={store}")
        assert s.returncode == 0, s.output
        assert s.slipstream_warnings == []
        ran.update(junit_ids(project / f"shard-{i}.xml"))
    assert set(ran.values()) == {1} and sorted(ran) == sorted(all_ids)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard-index", "0"], "give both --shard-index and --shard-total"),
        (["--shard-index", "3", "--shard-total", "3"], "from 0 to 2"),
        (["--shard-index", "0", "--shard-total", "2", "--shard-timings", "nope*.xml"], "no file"),
    ],
)
def test_bad_options_are_usage_errors(project, args, message):
    _, proc = run_pytest(project, "-q", *args)
    assert proc.returncode == 4  # pytest's usage error
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_path_option_that_moves_the_rootdir_is_warned_about(project, tmp_path):
    s = run_shard(project, 0, 2, "--shard-storage-dir", str(tmp_path / "elsewhere"))
    assert "write --shard-storage-dir=" in s.output


def _ran_once_across(project: pathlib.Path, shards: list[ShardRun]) -> collections.Counter[str]:
    ran: collections.Counter[str] = collections.Counter()
    for s in shards:
        assert s.returncode == 0, s.output
        ran.update(junit_ids(project / f"shard-{s.index}.xml"))
    assert set(ran.values()) == {1}, ran
    return ran


def test_a_subset_is_split_among_the_shards(project, all_ids):
    slow = [t for t in all_ids if t.startswith("tests/test_slow.py::")]
    for narrowing in (["tests/test_slow.py"], ["-k", "test_slow"]):
        shards = [
            run_shard(project, i, 4, "--shard-timings=full.xml", *narrowing) for i in range(4)
        ]
        ran = _ran_once_across(project, shards)
        assert sorted(ran) == sorted(slow)
        # 6 tests of ~0.15 s: every shard runs one or two of them.
        assert all(1 <= len(junit_ids(project / f"shard-{i}.xml")) <= 2 for i in range(4))
        assert len({s.plan_hash for s in shards}) == 1 and shards[0].plan_hash
        assert all(s.predicted is not None for s in shards)


def test_a_shard_with_nothing_to_run_exits_0_saying_why(project, all_ids, tmp_path):
    grouped = [t for t in all_ids if t.startswith("tests/test_grouped.py::")]
    with_timings = ("--shard-timings=full.xml", "tests/test_grouped.py")
    by_count = (f"--shard-storage-dir={tmp_path / 'none'}", "tests/test_grouped.py")
    for args in (with_timings, by_count):
        shards = [run_shard(project, i, 5, *args) for i in range(5)]
        assert sorted(_ran_once_across(project, shards)) == sorted(grouped)
        empty = [s for s in shards if not junit_ids(project / f"shard-{s.index}.xml")]
        assert len(empty) >= 2  # three tests, two of them kept together
        for s in empty:
            why = [line for line in s.output.splitlines() if "has no tests" in line]
            assert why == [
                f"slipstream split: shard {s.index} of 0..4 has no tests: every selected test "
                "went to another shard (exit status 0)"
            ], s.output
        assert not (tmp_path / "none").exists()  # reading the history created nothing


def test_without_timings_the_summary_says_there_is_no_prediction(project, tmp_path):
    s = run_shard(project, 0, 2, f"--shard-storage-dir={tmp_path / 'none'}", "tests/test_slow.py")
    assert s.returncode == 0, s.output
    assert "nan" not in s.output
    assert "s since the process started (no prediction: no timings for these tests)" in s.output


def test_the_plugin_help_says_what_each_option_is(project):
    _, proc = run_pytest(project, "--help")
    text = " ".join(proc.stdout.split())
    assert (
        "--run-key=RUN_KEY the CI run's id, e.g. $CI_PIPELINE_ID: every runner of one run "
        "gives the same key, and the server pins the run's plan under it" in text
    )
    assert (
        "--shard-storage-dir=DIR history store directory (default: the cache's, "
        "~/.cache/slipstream). Write --shard-storage-dir=DIR, with '=':" in text
    )
    assert "see the docs" not in text
